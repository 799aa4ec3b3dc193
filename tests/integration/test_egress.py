"""Egress under policy, through the real SDK, against a made-up internet (internet.py): on by
default, off, allow-lists, a denied address, domain rules, updates at runtime, and what no
rule opens (other sandboxes, the host, the metadata address, private networks).

Every probe is a short Python one-liner in the sandbox, so that a refused connection, a
dropped one (a timeout) and a refused name all show as a non-zero exit with a reason.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import ALL_TRAFFIC, CommandExitException, Sandbox

from coppice.egress_policy import EgressPolicy
from coppice.errors import CoppiceError
from coppice.images.keys import PoolKey
from coppice.pool.controller import PoolController
from coppice.smoke import ssh_command
from coppice.store.records import SandboxRecord, TemplateRecord

from .gateway_process import GatewayProcess, serving, wait_for
from .internet import METADATA, PRIVATE_HOST, WEB_A, WEB_B, TestInternet

pytestmark = pytest.mark.integration

POOL = 3


@pytest.fixture(scope="module")
def egress_gateway(
    cli_env: dict[str, str],
    base_template: TemplateRecord,
    controller: PoolController,
    internet: TestInternet,
    instance_dir: Path,
) -> Iterator[GatewayProcess]:
    log = instance_dir / "egress-gateway.log"
    with serving(cli_env, log, {base_template.name: POOL}, controller.drain) as gw:
        yield gw


def _fetch(target: str, timeout: float = 3.0) -> str:
    """A probe: GET http://<target>/ and print the body, or exit 1 with the error."""
    return (
        'python3 -c "import sys,urllib.request\n'
        "try:\n"
        f"  print(urllib.request.urlopen('http://{target}/', timeout={timeout}).read().decode())\n"
        "except Exception as e:\n"
        "  print('blocked:', e); sys.exit(1)\""
    )


def _reaches(sbx: Sandbox, target: str) -> bool:
    try:
        out = sbx.commands.run(_fetch(target), timeout=30).stdout
    except CommandExitException:
        return False
    assert out.startswith("hello from "), out
    return True


def _resolves(sbx: Sandbox, name: str) -> bool:
    try:
        sbx.commands.run(f"python3 -c \"import socket; socket.gethostbyname('{name}')\"")
    except CommandExitException:
        return False
    return True


@pytest.fixture()
def sbx(egress_gateway: GatewayProcess) -> Iterator[Sandbox]:
    s = Sandbox.create(timeout=120)
    yield s
    s.kill()


def test_on_by_default_with_a_working_resolver(sbx: Sandbox) -> None:
    assert sbx.get_info().allow_internet_access is True
    assert _reaches(sbx, "www.example.test")
    assert _reaches(sbx, WEB_B)
    assert not _resolves(sbx, "no-such-name.example.test")


def test_off(egress_gateway: GatewayProcess) -> None:
    s = Sandbox.create(timeout=120, allow_internet_access=False)
    try:
        assert s.get_info().allow_internet_access is False
        assert not _reaches(s, WEB_A)
        # Its queries go nowhere either: nothing is answered, so nothing is tunnelled out.
        assert not _resolves(s, "www.example.test")
    finally:
        s.kill()


def test_allow_list_with_deny_all(egress_gateway: GatewayProcess) -> None:
    s = Sandbox.create(timeout=120, network={"allow_out": [WEB_A], "deny_out": [ALL_TRAFFIC]})
    try:
        info = s.get_info()
        assert info.network is not None
        assert _reaches(s, WEB_A)
        assert not _reaches(s, WEB_B)
    finally:
        s.kill()


def test_deny_one_address(egress_gateway: GatewayProcess) -> None:
    s = Sandbox.create(timeout=120, network={"deny_out": [WEB_B]})
    try:
        assert _reaches(s, WEB_A)
        assert not _reaches(s, WEB_B)
    finally:
        s.kill()


def test_domain_allow_holds_against_other_names_and_bare_addresses(
    egress_gateway: GatewayProcess,
) -> None:
    s = Sandbox.create(
        timeout=120, network={"allow_out": ["www.example.test"], "deny_out": [ALL_TRAFFIC]}
    )
    try:
        assert _reaches(s, "www.example.test")
        # Another name (even on an address of its own) is not answered, and an address the
        # resolver never gave out stays closed when reached directly.
        assert not _resolves(s, "other.example.test")
        assert not _reaches(s, WEB_B)
    finally:
        s.kill()


def test_wildcard_domains(egress_gateway: GatewayProcess) -> None:
    s = Sandbox.create(
        timeout=120, network={"allow_out": ["*.allowed.test"], "deny_out": [ALL_TRAFFIC]}
    )
    try:
        assert _reaches(s, "api.allowed.test")
        assert not _resolves(s, "www.example.test")
    finally:
        s.kill()


def test_update_at_runtime(sbx: Sandbox) -> None:
    assert _reaches(sbx, WEB_A)
    sbx.update_network({"deny_out": [ALL_TRAFFIC]})
    assert not _reaches(sbx, WEB_A)
    assert sbx.get_info().network is not None
    sbx.update_network({"allow_out": [WEB_B], "deny_out": [ALL_TRAFFIC]})
    assert _reaches(sbx, WEB_B) and not _reaches(sbx, WEB_A)
    sbx.update_network({})  # everything omitted: everything cleared
    assert _reaches(sbx, WEB_A) and _reaches(sbx, WEB_B)


def test_bad_rules_are_a_clear_400(egress_gateway: GatewayProcess) -> None:
    with pytest.raises(Exception, match="deny rules take addresses only"):
        Sandbox.create(network={"deny_out": ["example.com"]})


# -- what no rule opens ------------------------------------------------------------------------


def _connects(sbx: Sandbox, host: str, port: int) -> bool:
    probe = (
        'python3 -c "import socket,sys\n'
        "try:\n"
        f"  socket.create_connection(('{host}', {port}), timeout=3).close()\n"
        "except OSError as e:\n"
        '  print(e); sys.exit(1)"'
    )
    try:
        sbx.commands.run(probe, timeout=30)
    except CommandExitException:
        return False
    return True


def test_never_another_sandbox(egress_gateway: GatewayProcess) -> None:
    a = Sandbox.create(timeout=120)
    b = Sandbox.create(timeout=120)
    try:
        b_ip = b.commands.run(". /etc/coppice-instance && echo $COPPICE_IP").stdout.strip()
        b.commands.run("python3 -m http.server 8000 >/dev/null 2>&1", background=True)
        # it answers at home, so only the host's rules can stop the other sandbox
        assert wait_for(lambda: _connects(b, "127.0.0.1", 8000), timeout_s=20)
        for port in (8000, 49983, 22):
            assert not _connects(a, b_ip, port)
    finally:
        a.kill()
        b.kill()


def test_never_the_metadata_address_nor_private_networks(sbx: Sandbox) -> None:
    # Both answer in the test internet; only the host's rules keep the sandbox out.
    assert not _reaches(sbx, METADATA)
    assert not _reaches(sbx, PRIVATE_HOST)
    sbx.update_network({"allow_out": [METADATA, PRIVATE_HOST]})
    assert not _reaches(sbx, METADATA)
    assert not _reaches(sbx, PRIVATE_HOST)


def test_never_the_hosts_own_services(sbx: Sandbox) -> None:
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    accepted: list[object] = []
    listener.settimeout(10)
    t = threading.Thread(target=lambda: accepted.append(_accept(listener)), daemon=True)
    t.start()
    try:
        gateway_ip = sbx.commands.run("ip route | awk '/default/ {print $3}'").stdout.strip()
        assert gateway_ip
        assert not _connects(sbx, gateway_ip, port)
        assert _connects(sbx, gateway_ip, 53)  # its resolver is the one door
    finally:
        listener.close()
        t.join()
    assert accepted == [None]


def _accept(listener: socket.socket) -> object:
    try:
        conn, _ = listener.accept()
    except OSError:
        return None
    conn.close()
    return "accepted"


# -- the vm substrate: the same tables judge a VM's tap -----------------------------------------


@pytest.mark.slow
def test_a_vm_sandbox_meets_the_same_rules(vm_pool: PoolController, internet: TestInternet) -> None:
    """Through the controller (the gateway's resolver is not running here): by address."""
    now = time.time()
    record = SandboxRecord(
        id="",
        template_id="python-vm",
        tenant="t",
        access_token="x",
        env_vars={},
        metadata={},
        started_at=now,
        end_at=now + 300,
        timeout_s=300,
        on_timeout="kill",
        auto_resume=False,
        idempotency_key=None,
        egress=EgressPolicy.parse(True, [], [WEB_B]),
    )
    assert not vm_pool.warm("python-vm", 1).failures
    entry = vm_pool.checkout("python-vm", record)
    key = PoolKey.at(vm_pool.settings.keys_dir)

    def fetch(target: str) -> bool:
        try:
            out = ssh_command(key, entry.ip, _fetch(target), timeout_s=60)
        except CoppiceError:
            return False
        return out.startswith("hello from ")

    try:
        assert fetch(WEB_A)
        assert not fetch(WEB_B)
        assert not fetch(METADATA)
        vm_pool.set_egress(entry, EgressPolicy.parse(False))
        assert not fetch(WEB_A)
    finally:
        vm_pool.return_entry(entry.id)
