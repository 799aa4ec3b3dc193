"""A jail's writable layer is a disk of its own with a hard quota, not memory; its tmpfs
mounts are bounded.

The python template runs with the default limits: 512 MiB of memory, a 1 GiB disk. Writing
2 GiB there must end in ENOSPC at the quota with the sandbox still answering, none of the
file held as memory, and the host's image never larger than the quota.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from coppice.config import Limits
from coppice.errors import HostResourceExhausted
from coppice.images.keys import PoolKey
from coppice.pool.controller import PoolController
from coppice.smoke import ssh_command
from coppice.store.records import TemplateRecord
from coppice.substrates.base import AGENT_PORT, SpawnSpec
from coppice.substrates.jail import JailSubstrate
from coppice.substrates.readiness import agent_health

from .hostscan import loop_devices_under

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def _ssh(pool: PoolController, ip: str, command: str, timeout_s: float = 30.0) -> str:
    return ssh_command(PoolKey.at(pool.settings.keys_dir), ip, command, timeout_s)


def _jail(pool: PoolController) -> JailSubstrate:
    jail = pool.substrate("jail")
    assert isinstance(jail, JailSubstrate)
    return jail


def _memory_dir(pool: PoolController, entry_id: str) -> Path:
    """The entry's memory cgroup (v1, as on this host, or v2)."""
    if _jail(pool).cgroups.version == 1:
        return Path("/sys/fs/cgroup/memory") / pool.settings.namespace / entry_id
    return Path("/sys/fs/cgroup") / pool.settings.namespace / entry_id


def _memory(pool: PoolController, entry_id: str, name: str) -> str:
    return (_memory_dir(pool, entry_id) / name).read_text()


def _stat(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def _oom_kills(pool: PoolController, entry_id: str) -> int:
    name = "memory.oom_control" if _jail(pool).cgroups.version == 1 else "memory.events"
    return _stat(_memory(pool, entry_id, name)).get("oom_kill", 0)


def _reclaim(pool: PoolController, entry_id: str) -> None:
    """Ask the kernel to reclaim what it can of the entry's memory cgroup."""
    v1 = _jail(pool).cgroups.version == 1
    name, value = ("memory.force_empty", "0") if v1 else ("memory.reclaim", "1G")
    (_memory_dir(pool, entry_id) / name).write_text(f"{value}\n")


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_a_write_past_the_quota_ends_in_enospc_and_the_sandbox_lives_on(
    pool: PoolController, template: TemplateRecord
) -> None:
    limits = template.policy.limits or pool.settings.limits
    assert (limits.memory_mb, limits.disk_mb) == (512, 1024)
    pool.warm("python", 1)
    e = pool.checkout("python")
    image = _jail(pool).disks.image(e.id)
    assert image.stat().st_size == limits.disk_mb * MIB

    # Watch the host's image while the sandbox writes: it never holds more than the quota.
    largest = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            largest[0] = max(largest[0], _allocated(image))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = _ssh(
            pool,
            e.ip,
            "dd if=/dev/zero of=/home/user/big bs=1M count=2048 2>&1; echo rc=$?",
            timeout_s=120,
        )
    finally:
        done.set()
        watcher.join()
    assert "No space left on device" in out and "rc=1" in out, out
    largest[0] = max(largest[0], _allocated(image))
    assert largest[0] <= limits.disk_mb * MIB

    # The sandbox and its agent are alive, nothing in it was OOM-killed, and it still works.
    assert _oom_kills(pool, e.id) == 0
    assert agent_health(e.ip, AGENT_PORT) == 204
    assert agent_health(e.ip, AGENT_PORT, path="/ready") == 204
    assert _ssh(pool, e.ip, "python3 -c 'print(6 * 7)'").strip() == "42"

    # The file is on the disk, not in memory: none of it is shmem (what a tmpfs holds), and
    # what page cache it left is given back when the cgroup is asked to reclaim.
    written = int(_ssh(pool, e.ip, "stat -c %s /home/user/big").strip())
    assert written > 900 * MIB
    memory = _stat(_memory(pool, e.id, "memory.stat"))
    shmem = memory.get("total_shmem", memory.get("shmem", 0))
    assert shmem < 64 * MIB, memory
    _reclaim(pool, e.id)
    usage = pool.substrate("jail").usage(e.id, e.handle)
    assert usage is not None
    assert usage.mem_used < 256 * MIB, usage  # the agent and its kernel, not the file

    # usage() reads the entry's own disk: full, and as large as the quota.
    assert 0.95 * limits.disk_mb * MIB <= usage.disk_total <= limits.disk_mb * MIB
    assert usage.disk_used > 0.95 * usage.disk_total

    # Deleting the file gives its blocks back to the host (the disk is mounted `discard`).
    _ssh(pool, e.ip, "rm /home/user/big && sync")
    assert _allocated(image) < 64 * MIB
    assert _ssh(pool, e.ip, "echo after > /home/user/small && cat /home/user/small").strip() == (
        "after"
    )


def test_teardown_leaves_no_loop_device_image_or_mount(pool: PoolController) -> None:
    disks_dir = pool.settings.entry_disks_dir
    pool.warm("python", 2)
    ids = {e.id for e in pool.list("python")}
    jail = _jail(pool)
    assert {p.name for p in disks_dir.glob("*.img")} == {f"{i}.img" for i in ids}
    backing = {b for _, b in loop_devices_under(disks_dir)}
    assert backing == {str(jail.disks.image(i)) for i in ids}
    for i in ids:
        assert os.path.ismount(jail.entry_dir(i))
    assert jail.host_objects().by_kind["loop devices"] == ids

    pool.checkout("python")  # a running one goes the same way as a paused one
    pool.drain("python")
    assert not list(disks_dir.glob("*.img"))
    assert not loop_devices_under(disks_dir)
    mounted = Path("/proc/mounts").read_text()
    assert not any(str(jail.entry_dir(i)) in mounted for i in ids)
    assert not jail.host_objects().all_ids()


def test_the_jail_s_tmpfs_mounts_are_bounded(pool: PoolController) -> None:
    pool.warm("python", 1)
    e = pool.checkout("python")
    out = _ssh(
        pool,
        e.ip,
        "df -k --output=target,size /dev/shm /run | tail -n +2;"
        " touch /dev/x 2>/dev/null && echo dev-writable || echo dev-read-only;"
        " stat -c %a /dev/shm",
    )
    sizes = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[:2]}
    assert sizes == {"/dev/shm": 128 * 1024, "/run": 32 * 1024}, out
    assert "dev-read-only" in out
    assert out.split()[-1] == "1777"
    # A quarter of the memory is all /dev/shm takes; the sandbox lives on when it is full.
    full = _ssh(pool, e.ip, "dd if=/dev/zero of=/dev/shm/fill bs=1M count=512 2>&1; echo rc=$?")
    assert "No space left on device" in full, full
    assert agent_health(e.ip, AGENT_PORT) == 204


def test_a_host_without_room_for_the_disk_refuses_the_spawn(
    pool: PoolController, template: TemplateRecord
) -> None:
    jail = _jail(pool)
    free = os.statvfs(pool.settings.state_dir)
    too_big = (free.f_bavail * free.f_frsize) // MIB + 1024
    entry_id = "00d15c0000"
    spec = SpawnSpec(entry_id, template, "10.0.0.1", "nodisk", Limits(disk_mb=too_big))
    try:
        with pytest.raises(HostResourceExhausted, match="free space there"):
            jail.spawn(spec)
    finally:
        jail.destroy(entry_id, None)
    assert entry_id not in jail.host_objects().all_ids()
