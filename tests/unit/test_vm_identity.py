"""A VM clone's identity message: built by the host, parsed and turned into commands by the
guest (the parts that need no root and no VM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coppice.substrates.identity_port import identity_message
from coppice_agent.identity import (
    PORT_NAME,
    Identity,
    IdentityApplier,
    IdentityError,
    answer,
    find_port,
    hosts_file,
    network_script,
)

KEY = b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"


def _message() -> dict[str, object]:
    return identity_message(
        ip="10.77.0.57",
        prefixlen=24,
        gateway="10.77.0.1",
        mac="02:c0:0a:4d:00:39",
        hostname="python-vm-3",
        entry_id="0123456789",
        ssh_host_key=KEY,
        now=1_800_000_000.5,
        seed=bytes(range(64)),
    )


def test_host_message_parses_in_the_guest() -> None:
    msg = json.loads(json.dumps(_message()))
    ident = Identity.from_message(msg)
    assert str(ident.ip) == "10.77.0.57/24"
    assert ident.seed == bytes(range(64))
    assert ident.time == 1_800_000_000.5
    assert ident.ssh_host_key == KEY.decode()


def test_network_script_moves_mac_and_address_in_one_batch() -> None:
    ident = Identity.from_message(_message())
    assert network_script(ident).splitlines() == [
        "link set eth0 down",
        "link set eth0 address 02:c0:0a:4d:00:39",
        "addr flush dev eth0",
        "addr add 10.77.0.57/24 dev eth0",
        "link set eth0 up",
        "route replace default via 10.77.0.1",
    ]
    assert hosts_file(ident) == "127.0.0.1 localhost\n10.77.0.57 python-vm-3\n"


@pytest.mark.parametrize(
    ("field", "value"),
    [("mac", "nonsense"), ("hostname", "bad name;rm"), ("ip", "10.0.0.300/24"), ("seed", "")],
)
def test_malformed_identities_are_refused(field: str, value: str) -> None:
    msg = _message() | {field: value}
    with pytest.raises(IdentityError):
        Identity.from_message(msg)


def test_ping_is_answered_without_applying(tmp_path: Path) -> None:
    assert answer(b'{"ping": true}', IdentityApplier(tmp_path)) == {"ok": True}


def test_a_bad_line_is_answered_with_the_error(tmp_path: Path) -> None:
    reply = answer(b'{"ip": "x"}', IdentityApplier(tmp_path))
    assert reply["ok"] is False and "malformed" in reply["error"]


def test_find_port_by_name(tmp_path: Path) -> None:
    ports = tmp_path / "virtio-ports"
    for name, port in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", PORT_NAME)):
        (ports / name).mkdir(parents=True)
        (ports / name / "name").write_text(port + "\n")
    assert find_port(ports, Path("/dev")) == Path("/dev/vport1p1")
    assert find_port(tmp_path / "absent") is None


def test_a_new_identity_drops_the_source_sandbox_s_access_token() -> None:
    """A fork goes on in its source's memory, where the source's token is set: the host's
    /init for the fork must not need it, and the source's callers must not get in."""
    import asyncio

    from coppice_agent.environment import SandboxEnvironment

    env = SandboxEnvironment()
    asyncio.run(env.init(access_token="source-token"))
    assert not env.token_ok(None)
    env.forget_sandbox()
    assert env.token_ok(None)
    asyncio.run(env.init(access_token="fork-token"))
    assert env.token_ok("fork-token") and not env.token_ok("source-token")
