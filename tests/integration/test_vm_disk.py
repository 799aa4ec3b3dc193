"""A vm sandbox's writable layer is a disk of the template's size in a file on the host's disk:
filling it is ENOSPC in the guest (which keeps answering), its files are not in guest RAM,
the file never outgrows the size, and nothing of it outlives the entry."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from coppice.config import Limits
from coppice.images.keys import PoolKey
from coppice.pool.controller import PoolController
from coppice.smoke import ssh_command
from coppice.store.records import TemplateRecord
from coppice.substrates.base import AGENT_PORT
from coppice.substrates.golden import WRITABLE, WRITABLE_SEED, golden_key
from coppice.substrates.readiness import agent_health
from coppice.substrates.vm import VmSubstrate
from coppice.substrates.vm_disk import (
    MIB,
    allocated_bytes,
    make_golden_disk,
    make_seed,
    writable_disk_bytes,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEMPLATE = "python-vm"
#: fills the disk with buffered writes (after direct ones have filled all but the last few
#: MiB) and says how it ended and how much it wrote
FILL = r"""
import errno, os
written = 0
try:
    with open("/home/user/fill-2", "wb") as f:
        while True:
            written += f.write(b"\x5a" * 65536)
            f.flush()
except OSError as exc:
    print(errno.errorcode[exc.errno], written)
"""


def _vm(pool: PoolController) -> VmSubstrate:
    sub = pool.substrates["vm"]
    assert isinstance(sub, VmSubstrate)
    return sub


def _limits(pool: PoolController, template: TemplateRecord) -> Limits:
    return template.policy.limits or pool.settings.limits


def _ssh(pool: PoolController, ip: str, command: str, timeout_s: float = 120) -> str:
    return ssh_command(PoolKey.at(pool.settings.keys_dir), ip, command, timeout_s=timeout_s)


def _meminfo(pool: PoolController, ip: str) -> dict[str, int]:
    fields = {}
    for line in _ssh(pool, ip, "cat /proc/meminfo").splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0]) * 1024
    return fields


def test_the_writable_disk_of_a_small_size_never_outgrows_it(tmp_path: Path) -> None:
    """Every block of a clone's qcow2 overlay written, as a guest filling its disk does, and
    the file on the host still within disk_mb: the overlay's own tables fit in the reserve."""
    size = writable_disk_bytes(64)
    make_golden_disk(tmp_path / WRITABLE, size)
    make_seed(tmp_path / WRITABLE, tmp_path / WRITABLE_SEED, size)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", str(tmp_path / WRITABLE_SEED)],
        check=True,
        capture_output=True,
    )
    disk = tmp_path / WRITABLE_SEED
    assert size <= allocated_bytes(disk) <= 64 * MIB
    assert disk.stat().st_size <= 64 * MIB


def test_a_write_past_the_disk_is_enospc_and_the_guest_keeps_answering(
    vm_pool: PoolController, vm_template: TemplateRecord
) -> None:
    pool = vm_pool
    vm = _vm(pool)
    limits = _limits(pool, vm_template)
    assert not pool.warm(TEMPLATE, 1).failures
    e = pool.checkout(TEMPLATE)
    disk = vm.disks.path(e.id)
    assert disk.is_file() and disk.is_relative_to(pool.settings.state_dir)
    assert not disk.is_relative_to(pool.settings.run_dir) and not str(disk).startswith("/dev/shm")

    size, avail = map(int, _ssh(pool, e.ip, "df -B1 --output=size,avail / | tail -1").split())
    assert 0.95 * writable_disk_bytes(limits.disk_mb) <= size <= limits.disk_mb * MIB
    assert _ssh(pool, e.ip, "findmnt -n /tmp || true").strip() == "", "/tmp must be on the disk"
    shmem_before = _meminfo(pool, e.ip)["Shmem"]

    # Direct writes fill it fast (no copy through the guest's page cache under TCG)...
    direct = subprocess.run(
        PoolKey.at(pool.settings.keys_dir).ssh_argv(
            e.ip, "dd if=/dev/zero of=/home/user/fill-1 bs=4M oflag=direct", batch=True
        ),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert direct.returncode != 0 and "No space left on device" in direct.stderr, direct.stderr
    # ...and ordinary buffered writes take it to the last block.
    ending, _ = _ssh(pool, e.ip, f"python3 -c '{FILL}' && sync").split()
    assert ending == "ENOSPC"
    assert int(_ssh(pool, e.ip, "df -B1 --output=avail / | tail -1")) < MIB
    written = int(_ssh(pool, e.ip, "du -cb /home/user/fill-* | tail -1").split()[0])
    assert written >= 0.95 * avail

    # The guest and its agent keep answering, with the disk full.
    assert agent_health(e.ip, AGENT_PORT, timeout_s=5) == 204
    assert _ssh(pool, e.ip, "echo alive").strip() == "alive"
    meminfo = _meminfo(pool, e.ip)
    # The files are on the disk, not in guest RAM: no tmpfs grew, and more was written than
    # the guest has memory.
    assert meminfo["Shmem"] - shmem_before < 16 * MIB
    if limits.disk_mb > limits.memory_mb:
        assert written > meminfo["MemTotal"]

    # On the host: the file holds what was written, and never more than the disk's size.
    assert written <= allocated_bytes(disk) <= limits.disk_mb * MIB
    assert disk.stat().st_size <= limits.disk_mb * MIB

    usage = vm.usage(e.id, e.handle)
    assert usage is not None
    assert usage.disk_total == writable_disk_bytes(limits.disk_mb)
    assert written <= usage.disk_used <= usage.disk_total
    assert usage.cpu_seconds > 0
    assert 0 < usage.mem_used <= usage.mem_total == limits.memory_mb * MIB

    # Deleting gives the space back, in the guest and on the host (discard).
    _ssh(pool, e.ip, "rm /home/user/fill-1 /home/user/fill-2 && sync")
    assert _ssh(pool, e.ip, "echo ok > /home/user/after && cat /home/user/after").strip() == "ok"
    assert wait_until(lambda: allocated_bytes(disk) < 64 * MIB, timeout=30), allocated_bytes(disk)


def test_the_golden_disk_is_kept_read_only_beside_the_snapshot(
    vm_pool: PoolController, vm_template: TemplateRecord
) -> None:
    vm = _vm(vm_pool)
    golden = vm.golden(vm_template, _limits(vm_pool, vm_template))
    root = vm.goldens.root / golden_key(vm_template)
    assert Path(golden.writable_disk) == root / WRITABLE
    assert Path(golden.writable_seed) == root / WRITABLE_SEED
    assert (root / WRITABLE).stat().st_mode & 0o222 == 0
    assert (root / WRITABLE).is_relative_to(vm_pool.settings.state_dir)

    # forget_template removes a template's golden disk with the rest of its snapshot.
    fake = vm.goldens.root / "gone-vm-0123456789ab"
    fake.mkdir()
    for name in ("meta.json", "device.state", WRITABLE, WRITABLE_SEED):
        (fake / name).write_bytes(b"x")
    vm.forget_template("gone-vm")
    assert not fake.exists() and root.is_dir()


def test_teardown_deletes_the_disk_and_reconcile_removes_leaked_ones(
    vm_pool: PoolController, vm_template: TemplateRecord
) -> None:
    pool = vm_pool
    vm = _vm(pool)
    assert not pool.warm(TEMPLATE, 2).failures
    ids = {e.id for e in pool.list(TEMPLATE)}
    assert vm.host_objects().by_kind["disks"] == ids
    assert all(vm.disks.path(i).is_file() for i in ids)

    # A clone whose QEMU died: reconcile replaces it, and its disk goes with it.
    victim = pool.list(TEMPLATE)[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    assert wait_until(lambda: not vm.is_alive(victim.id, victim.handle), timeout=10)
    report = pool.reconcile()
    assert any(r.startswith(victim.id) for r in report.replaced), report
    assert not vm.disks.path(victim.id).exists()

    # A disk no entry owns (a crash between making it and recording the entry's handle).
    golden = vm.golden(vm_template, _limits(pool, vm_template))
    leaked = vm.disks.path("feedc0ffee")
    shutil.copyfile(golden.writable_seed, leaked)
    assert "feedc0ffee" in vm.host_objects().all_ids()
    report = pool.reconcile()
    assert "feedc0ffee" in report.leftovers_removed, report
    assert not leaked.exists()

    started = time.monotonic()
    assert pool.drain(TEMPLATE) == 2
    print(f"drain of 2 clones: {time.monotonic() - started:.2f} s")
    assert not vm.host_objects().all_ids()
    assert not any(vm.disks.root.iterdir())
