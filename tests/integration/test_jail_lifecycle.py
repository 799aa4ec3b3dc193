"""The pool lifecycle on real jails, driven through the library a service would use."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from coppice.errors import EntryNotFound, IllegalTransition, PoolExhausted
from coppice.images.keys import PoolKey
from coppice.lifecycle import Event, State
from coppice.pool.controller import PoolController
from coppice.smoke import ssh_command
from coppice.store.ipam import mac_for
from coppice.substrates.base import AGENT_PORT
from coppice.substrates.readiness import agent_health, ssh_banner

pytestmark = pytest.mark.integration


def _ssh(pool: PoolController, ip: str, command: str) -> str:
    return ssh_command(PoolKey.at(pool.settings.keys_dir), ip, command)


def test_warm_checkout_return_drain(pool: PoolController) -> None:
    report = pool.warm("python", 2)
    assert not report.failures
    entries = pool.list("python")
    assert [e.state for e in entries] == [State.AVAILABLE, State.AVAILABLE]
    assert len({e.ip for e in entries}) == 2

    e = pool.checkout("python")
    assert e.state is State.IN_USE
    assert ssh_banner(e.ip).startswith("SSH-2.0-OpenSSH")
    assert agent_health(e.ip, AGENT_PORT) == 204
    assert agent_health(e.ip, AGENT_PORT, path="/ready") == 204  # kernel warm before pause
    assert _ssh(pool, e.ip, "python3 -c 'print(1+1)'").strip() == "2"

    fresh = pool.return_entry(e.id)
    assert fresh is not None and fresh.state is State.AVAILABLE
    with pytest.raises(EntryNotFound):
        pool.return_entry(e.id)  # returning twice
    assert len(pool.list("python")) == 2

    assert pool.drain("python") == 2
    assert pool.list("python") == []


def test_available_entries_are_frozen_and_checkout_thaws(pool: PoolController) -> None:
    pool.warm("python", 1)
    (entry,) = pool.list("python")
    with pytest.raises(OSError):
        agent_health(entry.ip, AGENT_PORT, timeout_s=0.3)  # paused: the kernel queues, no answer
    got = pool.checkout("python")
    assert got.id == entry.id
    assert agent_health(got.ip, AGENT_PORT)


def test_return_of_an_available_entry_is_refused(pool: PoolController) -> None:
    pool.warm("python", 1)
    (entry,) = pool.list("python")
    with pytest.raises(IllegalTransition):
        pool.return_entry(entry.id)
    assert pool.store.get(entry.id).state is State.AVAILABLE


def test_concurrent_checkouts_never_share_an_entry(pool: PoolController) -> None:
    pool.warm("python", 4)
    got: list[str] = []
    exhausted: list[str] = []
    lock = threading.Lock()

    def take() -> None:
        try:
            e = pool.checkout("python")
            with lock:
                got.append(e.id)
        except PoolExhausted as exc:
            with lock:
                exhausted.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and len(set(got)) == 4
    assert len(exhausted) == 4 and "coppice pool warm" in exhausted[0]


def test_jail_isolation(pool: PoolController) -> None:
    pool.warm("python", 2)
    a = pool.checkout("python")
    b = pool.checkout("python")
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(('{b.ip}', 22), timeout=1); print('reached')\n"
        "except OSError as e: print('blocked', e)\n"
    )
    out = _ssh(pool, a.ip, f'python3 -c "{probe}"')
    assert out.startswith("blocked"), out

    report = _ssh(
        pool,
        a.ip,
        "cat /proc/self/uid_map; grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status;"
        " unshare -U true 2>/dev/null && echo unshare-ok || echo unshare-denied;"
        " mount -t tmpfs none /mnt 2>/dev/null && echo mount-ok || echo mount-denied;"
        " ip addr add 10.79.0.9/24 dev eth0 2>/dev/null && echo addr-ok || echo addr-denied;"
        " hostname",
    )
    lines = report.split()
    jail_ids = ["0", str(pool.settings.jail_uid_base), str(pool.settings.jail_uid_count)]
    assert a.pid is not None and a.handle is not None
    if "zygote" in a.handle.driver:
        # A zygote's fork has a user namespace of its own inside the zygote's (same ids):
        # it sees its map relative to that one, the host sees the jail's range.
        assert lines[:3] == ["0", "0", str(pool.settings.jail_uid_count)]
        assert Path(f"/proc/{a.pid}/uid_map").read_text().split() == jail_ids
    else:
        assert lines[:3] == jail_ids
    assert "NoNewPrivs:" in report and report.split("NoNewPrivs:")[1].split()[0] == "1"
    assert report.split("Seccomp:")[1].split()[0] == "2"
    for denied in ("unshare-denied", "mount-denied", "addr-denied"):
        assert denied in report
    assert a.hostname in report

    # The jail's processes run as the mapped uid on the host, not as root.
    pid = a.pid
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1] == str(pool.settings.jail_uid_base)


def test_sandboxes_cannot_open_connections_to_the_host(pool: PoolController) -> None:
    gateway = str(pool.settings.jail_network.gateway)
    with socket.create_server((gateway, 0)) as listener:
        port = listener.getsockname()[1]
        pool.warm("python", 1)
        e = pool.checkout("python")
        probe = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('{gateway}', {port}), timeout=1); print('reached')\n"
            "except OSError as e: print('blocked', e)\n"
        )
        out = _ssh(pool, e.ip, f'python3 -c "{probe}"')  # host -> sandbox still works
    assert out.startswith("blocked"), out


def test_cgroup_limits_hold(pool: PoolController) -> None:
    pool.warm("python", 1)
    e = pool.checkout("python")
    hog = "python3 -c 'x = bytearray(900 * 2**20)'; echo rc=$?"
    assert "rc=137" in _ssh(pool, e.ip, hog)  # OOM-killed at the 512 MiB default
    forks = (
        'python3 -c "import os\nn=0\ntry:\n    while True:\n        pid=os.fork()\n'
        "        if pid == 0:\n            import time; time.sleep(5); os._exit(0)\n"
        "        n+=1\nexcept OSError:\n    print('stopped', n)\""
    )
    out = _ssh(pool, e.ip, forks)
    assert out.startswith("stopped"), out
    assert int(out.split()[1]) < pool.settings.limits.pids


def test_the_bridge_mac_does_not_follow_its_ports(pool: PoolController) -> None:
    """A bridge takes its lowest port's MAC unless it has one of its own; when that port went
    with its sandbox, every other sandbox's neighbour entry for the gateway went stale and
    their answers were lost for seconds (TCP retransmits: 13 s stalls through the gateway)."""
    bridge = pool.settings.jail_network.bridge
    address = Path(f"/sys/class/net/{bridge}/address")
    fixed = mac_for(pool.settings.jail_network.gateway)
    pool.warm("python", 3)
    assert address.read_text().strip() == fixed
    for e in pool.list("python")[:2]:
        pool.perform(pool.store.apply(e.id, Event.DRAIN))
    pool.warm("python", 2)
    assert address.read_text().strip() == fixed
    entry = pool.checkout("python")
    assert agent_health(entry.ip, AGENT_PORT) == 204
