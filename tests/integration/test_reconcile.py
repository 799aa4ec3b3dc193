"""Reconcile after the worst: kill -9 of a sandbox, of a warm half-way, unknown leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.substrates.base import AGENT_PORT
from coppice.substrates.readiness import agent_health

from .conftest import TEST_LINKS, TEST_NAMESPACE, run_cli
from .hostscan import HostSnapshot, loop_devices_under

pytestmark = pytest.mark.integration


def _host_ids(pool: PoolController) -> set[str]:
    ids: set[str] = set()
    for sub in pool.substrates.values():
        ids |= sub.host_objects().all_ids()
    return ids


def test_kill9_of_a_sandbox_is_replaced(pool: PoolController) -> None:
    pool.warm("python", 2)
    before = HostSnapshot.take(TEST_NAMESPACE, TEST_LINKS)
    # A running (checked-out) sandbox: the v1 freezer holds signals to frozen ones until thaw.
    victim = pool.checkout("python")
    (survivor,) = [e for e in pool.list("python") if e.id != victim.id]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    jail = pool.substrate("jail")
    deadline = time.monotonic() + 10
    while jail.is_alive(victim.id, victim.handle):  # the kill lands, not a guessed delay
        assert time.monotonic() < deadline, "SIGKILL did not end the jail's head process"
        time.sleep(0.01)

    report = pool.reconcile()
    assert any(line.startswith(victim.id) for line in report.replaced), report
    ids = {e.id for e in pool.list("python")}
    assert victim.id not in ids and survivor.id in ids and len(ids) == 2
    assert all(e.state is State.AVAILABLE for e in pool.list("python"))
    # Only the jail's top process was killed; reconcile must still end everything inside it.
    assert _host_ids(pool) == ids
    after = HostSnapshot.take(TEST_NAMESPACE, TEST_LINKS)
    # Same number of everything: one entry's objects swapped for another's.
    assert len(after.mounts) == len(before.mounts)
    assert len(after.netns) == len(before.netns)
    assert len(after.cgroups) == len(before.cgroups)

    e = pool.checkout("python")
    assert agent_health(e.ip, AGENT_PORT)


def test_kill9_of_a_warm_half_way(pool: PoolController, cli_env: dict[str, str]) -> None:
    exe = str(Path(__file__).parents[2] / ".venv/bin/coppice")
    proc = subprocess.Popen(
        [exe, "pool", "warm", "python", "--count", "6"],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Wait until the warm has reserved entries and started building some of them.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _host_ids(pool):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pool.list("python"), "the warm was killed before it reserved anything"

    report = pool.reconcile()
    entries = pool.list("python")
    assert all(e.state is State.AVAILABLE for e in entries), ([e.state for e in entries], report)
    assert _host_ids(pool) == {e.id for e in entries}
    assert len(entries) == 6  # interrupted entries are replaced, so the pool keeps its size


def test_unknown_leftovers_are_removed(pool: PoolController) -> None:
    sub = pool.substrates["jail"]
    ghost = "0000dead00"
    pool.settings.entries_dir.joinpath(ghost).mkdir(parents=True)
    subprocess.run(["ip", "netns", "add", f"{TEST_NAMESPACE}-{ghost}"], check=True)
    for c in ("memory", "pids", "cpu", "freezer"):
        Path(f"/sys/fs/cgroup/{c}/{TEST_NAMESPACE}/{ghost}").mkdir()
    assert ghost in sub.host_objects().all_ids()

    report = pool.reconcile()
    assert ghost in report.leftovers_removed
    assert ghost not in sub.host_objects().all_ids()


def test_leaked_disk_images_and_loop_devices_are_removed(pool: PoolController) -> None:
    """What a crash leaves of entry disks: an image on a loop device, an image alone (after
    a reboot), and a loop device whose image is already deleted (a teardown cut short)."""
    sub = pool.substrates["jail"]
    disks = pool.settings.entry_disks_dir
    disks.mkdir(parents=True, exist_ok=True)
    attached, alone, unlinked = "0000d15c01", "0000d15c02", "0000d15c03"
    for ghost in (attached, alone, unlinked):
        with open(disks / f"{ghost}.img", "wb") as f:
            f.truncate(16 * 2**20)
    for ghost in (attached, unlinked):
        subprocess.run(["losetup", "--find", str(disks / f"{ghost}.img")], check=True)
    (disks / f"{unlinked}.img").unlink()
    owners = sub.host_objects().by_kind
    assert owners["disk images"] >= {attached, alone}
    assert owners["loop devices"] >= {attached, unlinked}

    report = pool.reconcile()
    assert {attached, alone, unlinked} <= set(report.leftovers_removed), report
    assert not sub.host_objects().all_ids() & {attached, alone, unlinked}
    assert not loop_devices_under(disks)
    assert not list(disks.glob("*.img"))


def test_reconcile_command_reports(pool: PoolController, cli_env: dict[str, str]) -> None:
    done = run_cli(cli_env, "pool", "reconcile")
    assert done.returncode == 0, done.stderr
    assert "nothing to fix" in done.stderr


def test_host_reboot_is_survived(pool: PoolController) -> None:
    """Everything runtime goes (processes, mounts, netns, cgroups, bridge); the database stays."""
    pool.warm("python", 2)
    pool.checkout("python")
    before = {e.id for e in pool.list("python")}
    sub = pool.substrates["jail"]
    for e in pool.list("python"):
        sub.destroy(e.id, e.handle)
    sub.teardown_host()

    report = pool.reconcile()
    assert len(report.replaced) == 2, report
    entries = pool.list("python")
    assert len(entries) == 2 and not ({e.id for e in entries} & before)
    assert all(e.state is State.AVAILABLE for e in entries)
    assert agent_health(pool.checkout("python").ip, AGENT_PORT)


def test_reconcile_leaves_this_process_s_own_warms_alone(pool: PoolController) -> None:
    """A service reconciles while its own threads are warming: those entries are not lost."""
    with ThreadPoolExecutor(1) as background:
        warming = background.submit(pool.warm, "python", 3)
        deadline = time.monotonic() + 30
        while not any(e.state is State.WARMING for e in pool.list("python")):
            assert time.monotonic() < deadline, "the warm never started"
            time.sleep(0.01)
        report = pool.reconcile()
        assert not report.replaced and not report.finished_teardowns, report
        assert not warming.result().failures
    assert [e.state for e in pool.list("python")] == [State.AVAILABLE] * 3
