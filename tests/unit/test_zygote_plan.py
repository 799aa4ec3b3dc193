"""The pure parts of the template zygote: what a request decodes to, the steps a fork
builds its root with, the wire format both sides speak, and its init's small rules."""

from __future__ import annotations

import os
import socket

import pytest

from coppice.substrates import zygote_wire
from coppice.substrates.jail import CAPABILITIES
from coppice.substrates.jail_zygote import EntryDescriptors
from coppice_agent import kernel_fork
from coppice_agent.kernels import KernelLaunch
from coppice_agent.users import SandboxUser
from coppice_agent.zygote import wire
from coppice_agent.zygote.init import exit_code, instance_environment
from coppice_agent.zygote.linux import CAPABILITY_NUMBERS
from coppice_agent.zygote.plan import (
    NEW_ROOT,
    Attach,
    BadRequest,
    EntryRequest,
    Proc,
    RemountReadOnly,
    Tmpfs,
    capability_numbers,
    root_steps,
)


def _body(roles: list[str]) -> dict[str, object]:
    return {
        "op": "entry",
        "entry_id": "0123456789",
        "hostname": "e2b-x",
        "shm_bytes": 128 << 20,
        "run_bytes": 32 << 20,
        "capabilities": list(CAPABILITIES),
        "uid_count": 65536,
        "fds": roles,
    }


def _request() -> EntryRequest:
    descriptors = EntryDescriptors(10, 11, 12, [13, 14], {"meminfo": 15, "cpuinfo": 16})
    roles, fds = descriptors.roles_and_fds()
    return EntryRequest.decode(_body([*roles, "report"]), [*fds, 17])


def test_the_hosts_descriptors_decode_to_their_roles() -> None:
    request = _request()
    assert (request.root_fd, request.console_fd, request.seccomp_fd) == (10, 11, 12)
    assert request.cgroup_fds == (13, 14)
    assert request.report_fd == 17
    assert dict(request.proc_fds) == {"cpuinfo": 16, "meminfo": 15}
    assert sorted(request.fds) == list(range(10, 18))


@pytest.mark.parametrize(
    ("roles", "fds"),
    [
        (["root", "console", "seccomp"], [1, 2, 3]),  # no report socket
        (["root", "console", "seccomp", "report"], [1, 2, 3]),  # fewer fds than roles
        (["root", "root", "console", "seccomp", "report"], [1, 2, 3, 4, 5]),
        (["root", "console", "seccomp", "report", "proc:../etc"], [1, 2, 3, 4, 5]),
        (["root", "console", "seccomp", "report", "what"], [1, 2, 3, 4, 5]),
    ],
)
def test_requests_that_do_not_say_what_an_entry_needs_are_refused(
    roles: list[str], fds: list[int]
) -> None:
    with pytest.raises(BadRequest):
        EntryRequest.decode(_body(roles), fds)


def test_unknown_capabilities_are_refused() -> None:
    body = _body(["root", "console", "seccomp", "report"]) | {"capabilities": ["CAP_BOGUS"]}
    with pytest.raises(BadRequest):
        EntryRequest.decode(body, [1, 2, 3, 4])


def test_the_jails_capabilities_are_known_by_number() -> None:
    assert capability_numbers(CAPABILITIES) == frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 29})
    assert CAPABILITY_NUMBERS["CAP_SYS_ADMIN"] == 21
    assert CAPABILITY_NUMBERS["CAP_NET_ADMIN"] == 12


def test_the_root_is_built_as_bwrap_builds_a_jails() -> None:
    steps = root_steps(_request())
    # A staging tmpfs of the fork's own, then its overlay, then a procfs of its own pid
    # namespace with lxcfs's files over it (after it, or they would be hidden).
    assert steps[0] == Tmpfs("/tmp", "mode=0700,size=65536")
    assert steps.index(Attach(10, NEW_ROOT)) < steps.index(Proc(f"{NEW_ROOT}/proc"))
    proc = steps.index(Proc(f"{NEW_ROOT}/proc"))
    lxcfs = [s for s in steps if isinstance(s, Attach) and s.target.startswith(f"{NEW_ROOT}/proc/")]
    assert {s.target for s in lxcfs} == {f"{NEW_ROOT}/proc/meminfo", f"{NEW_ROOT}/proc/cpuinfo"}
    assert all(steps.index(s) > proc for s in lxcfs)
    # /dev/shm and /run bounded as sized; /dev read-only once /dev/shm is in place
    shm = Tmpfs(f"{NEW_ROOT}/dev/shm", f"mode=1777,size={128 << 20}")
    assert steps.index(shm) < steps.index(RemountReadOnly(f"{NEW_ROOT}/dev"))
    assert Tmpfs(f"{NEW_ROOT}/run", f"mode=0755,size={32 << 20}") in steps
    # nothing is mounted outside the new root but the staging tmpfs
    targets = [getattr(s, "target", getattr(s, "path", "")) for s in steps[1:]]
    assert all(t.startswith(NEW_ROOT) for t in targets)


def test_host_and_zygote_speak_the_same_wire_format() -> None:
    host, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with host, zygote:
        zygote_wire.send(host, {"op": "entry", "n": 1}, [r])
        got = wire.receive(zygote)
        assert got is not None and got.body == {"op": "entry", "n": 1}
        assert len(got.fds) == 1 and os.path.sameopenfile(got.fds[0], r)
        os.close(got.fds[0])
        host.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        wire.send_with_credentials(zygote, {"ready": True}, os.getpid(), os.getuid(), os.getgid())
        back = zygote_wire.receive(host, 1.0)
        assert back is not None and back.body == {"ready": True}
        assert back.sender_pid == os.getpid()
        zygote.close()
        assert zygote_wire.receive(host, 1.0) is None  # end of stream
    os.close(r)
    os.close(w)


def test_the_host_does_not_wait_forever_for_a_fork() -> None:
    host, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with host, zygote, pytest.raises(TimeoutError):
        zygote_wire.receive(host, 0.01)


def test_the_instance_file_becomes_environment() -> None:
    text = "COPPICE_ENTRY_ID=abc\nCOPPICE_IP=10.0.0.5\n# note\nbad line\n"
    assert instance_environment(text) == {"COPPICE_ENTRY_ID": "abc", "COPPICE_IP": "10.0.0.5"}


def test_the_entry_ends_with_the_agents_status_as_sh_reports_it() -> None:
    assert exit_code(3 << 8) == 3
    assert exit_code(15) == 128 + 15  # killed by SIGTERM


def _launch(env: dict[str, str]) -> KernelLaunch:
    user = SandboxUser("user", 1000, 1000, "/home/user", "/bin/bash", ())
    return KernelLaunch(argv=("python3",), user=user, cwd="/home/user", env=env)


def test_only_a_launch_an_interpreter_would_start_alike_gets_a_forked_kernel() -> None:
    assert kernel_fork.forkable(_launch({"PATH": "/usr/bin", "MY_VAR": "1"}))
    assert not kernel_fork.forkable(_launch({"PYTHONPATH": "/opt/lib"}))
    assert kernel_fork.take_fork(_launch({})) is None  # no channel: not a zygote's entry
