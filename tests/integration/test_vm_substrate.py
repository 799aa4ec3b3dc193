"""The pool lifecycle on real QEMU microVMs cloned from a golden snapshot (TCG on CI hosts)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from coppice.images.keys import PoolKey
from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.smoke import ssh_command
from coppice.store.ipam import mac_for
from coppice.store.records import EntryRecord
from coppice.substrates import qemu_process
from coppice.substrates.base import AGENT_PORT
from coppice.substrates.readiness import agent_health, ssh_banner
from coppice.substrates.vm import VmSubstrate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEMPLATE = "python-vm"
# One command prints everything that makes a clone itself, one value per line.
IDENTITY_PROBE = (
    "cat /sys/class/net/eth0/address; hostname; ip -4 -o addr show dev eth0 | "
    "awk '{print $4}'; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s"
)


def _ssh(pool: PoolController, ip: str, command: str) -> str:
    return ssh_command(PoolKey.at(pool.settings.keys_dir), ip, command, timeout_s=60)


def _host_key(ip: str) -> str:
    done = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-T", "20", ip],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    keys = [line.split()[-1] for line in done.stdout.splitlines() if "ssh-ed25519" in line]
    assert keys, f"no host key from {ip}: {done.stderr}"
    return keys[0]


def _vm(pool: PoolController) -> VmSubstrate:
    sub = pool.substrates["vm"]
    assert isinstance(sub, VmSubstrate)
    return sub


def _qemu_pids(pool: PoolController) -> set[int]:
    return set(qemu_process.processes_under(_vm(pool).vm_dir))


def test_clones_warm_check_out_with_their_own_identity_and_leave_nothing(
    vm_pool: PoolController,
) -> None:
    pool = vm_pool
    report = pool.warm(TEMPLATE, 2)
    assert not report.failures, report.failures
    entries = pool.list(TEMPLATE)
    assert [e.state for e in entries] == [State.AVAILABLE, State.AVAILABLE]
    for e in entries:
        assert e.handle is not None and e.handle.detail in ("tcg", "kvm")
        with pytest.raises(OSError):
            agent_health(e.ip, AGENT_PORT, timeout_s=0.3)  # paused: nothing answers

    seen: dict[str, EntryRecord] = {}
    for _ in entries:
        started = time.perf_counter()
        e = pool.checkout(TEMPLATE)
        assert agent_health(e.ip, AGENT_PORT, timeout_s=5) == 204
        first_answer_ms = (time.perf_counter() - started) * 1000
        print(f"checkout -> first answer {first_answer_ms:.1f} ms ({e.id})")
        assert ssh_banner(e.ip).startswith("SSH-2.0-OpenSSH")
        assert _ssh(pool, e.ip, "python3 -c 'print(1+1)'").strip() == "2"
        seen[e.id] = e

    facts = {}
    for e in seen.values():
        mac, hostname, cidr, noise, clock = _ssh(pool, e.ip, IDENTITY_PROBE).split()
        assert mac == mac_for(e.ip)
        assert hostname == e.hostname
        assert cidr == f"{e.ip}/{pool.settings.vm_network.prefixlen}"
        assert abs(int(clock) - time.time()) < 30, "the clone's clock was not set"
        facts[e.id] = (mac, hostname, cidr, noise, _host_key(e.ip))
    a, b = facts.values()
    for what, x, y in zip(("mac", "hostname", "address", "urandom", "host key"), a, b, strict=True):
        assert x != y, f"both clones share their {what}"

    returned = next(iter(seen.values()))
    fresh = pool.return_entry(returned.id)
    assert fresh is not None and fresh.state is State.AVAILABLE
    assert fresh.id not in seen

    assert pool.drain(TEMPLATE) == 2
    assert pool.list(TEMPLATE) == []
    assert not _vm(pool).host_objects().all_ids()
    assert not _qemu_pids(pool)


def test_reconcile_replaces_a_clone_whose_qemu_was_killed(vm_pool: PoolController) -> None:
    pool = vm_pool
    assert not pool.warm(TEMPLATE, 1).failures
    (victim,) = pool.list(TEMPLATE)
    assert victim.handle is not None
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _vm(pool).is_alive(victim.id, victim.handle) and time.monotonic() < deadline:
        time.sleep(0.05)

    report = pool.reconcile()
    assert report.replaced and report.replaced[0].startswith(victim.id), report
    (fresh,) = pool.list(TEMPLATE)
    assert fresh.id != victim.id and fresh.state is State.AVAILABLE
    assert victim.id not in _vm(pool).host_objects().all_ids()
    got = pool.checkout(TEMPLATE)
    assert agent_health(got.ip, AGENT_PORT, timeout_s=5) == 204
