"""Snapshots, forks and the files-only pause below the gateway: the PoolController and the
SnapshotController over the fake substrate and a real SQLite store, including what
reconcile does after a crash in the middle of a capture and after a host reboot."""

from __future__ import annotations

from pathlib import Path

import pytest

from coppice.errors import (
    DiskBudgetExceeded,
    NotSupportedOnSubstrate,
    SubstrateError,
)
from coppice.host.processes import ProcessIdentity
from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.pool.snapshots import SnapshotController
from coppice.store.records import EntryRecord
from coppice.store.store import Store
from coppice.substrates.base import Persistence, SpawnSpec
from coppice.substrates.snapshots_not_yet import SnapshotsNotYet

from .fake_pool import TEMPLATE, FakePool, fake_pool, sandbox_record

#: a process that is not running (pid 1's start time is never 1)
GONE_OWNER = ProcessIdentity(1, 1)
JAIL_LIKE = Persistence(memory_in_snapshots=False, memory_pause_survives_reboot=False)


@pytest.fixture()
def pool(tmp_path: Path) -> FakePool:
    return fake_pool(tmp_path)


def running(pool: FakePool, files: dict[str, str] | None = None) -> EntryRecord:
    """A handed-out sandbox with some files and memory."""
    entry = pool.controller.start_cold(TEMPLATE, sandbox_record())
    sandbox = pool.fake.sandboxes[entry.id]
    sandbox.files.update(files or {"/home/user/a.txt": "hello"})
    sandbox.memory["x"] = "42"
    return entry


def snapshots(pool: FakePool) -> SnapshotController:
    return SnapshotController(pool.controller)


# -- snapshots ----------------------------------------------------------------------------------


def test_a_snapshot_keeps_files_and_memory_and_the_source_runs_on(pool: FakePool) -> None:
    source = running(pool)
    snap = snapshots(pool).take(source.id, "t", "nightly", None)
    assert (snap.state, snap.kind, snap.name, snap.source_id) == (
        "ready",
        "files+memory",
        "nightly",
        source.id,
    )
    assert snap.size_bytes == sum(f.stat().st_size for f in Path(snap.path).iterdir())
    assert pool.store.get(source.id).state is State.IN_USE
    # thawed after the capture, whatever the driver did
    assert pool.fake.calls_for(source.id)[-2:] == ["snapshot", "end_capture"]

    started = snapshots(pool).start_from(snap, sandbox_record())
    copy = pool.fake.sandboxes[started.id]
    assert started.id != source.id and started.state is State.IN_USE
    assert copy.files == {"/home/user/a.txt": "hello"} and copy.memory == {"x": "42"}
    assert "spawn_from_snapshot" in pool.fake.calls_for(started.id)


def test_a_newer_snapshot_takes_the_name_over(pool: FakePool) -> None:
    source = running(pool)
    first = snapshots(pool).take(source.id, "t", "latest", None)
    second = snapshots(pool).take(source.id, "t", "latest", None)
    assert pool.store.named_snapshot("t", "latest") == pool.store.get_snapshot(second.id)
    kept = pool.store.get_snapshot(first.id)
    assert kept is not None and kept.name is None  # still there, by id


def test_where_memory_cannot_be_kept_a_snapshot_keeps_files_and_says_so(pool: FakePool) -> None:
    pool.fake.persistence = JAIL_LIKE
    source = running(pool)
    snap = snapshots(pool).take(source.id, "t", None, None)
    assert snap.kind == "files" and not snap.kept_memory
    assert not (Path(snap.path) / "memory.json").exists()
    with pytest.raises(NotSupportedOnSubstrate, match="keeps memory"):
        snapshots(pool).take(source.id, "t", None, keep_memory=True)
    assert pool.store.get(source.id).state is State.IN_USE
    started = snapshots(pool).start_from(snap, sandbox_record())
    assert pool.fake.sandboxes[started.id].memory == {}


def test_a_failed_snapshot_leaves_nothing_and_the_source_running(pool: FakePool) -> None:
    source = running(pool)
    pool.fake.failing_snapshots = 1
    with pytest.raises(SubstrateError, match="as asked"):
        snapshots(pool).take(source.id, "t", "x", None)
    assert pool.store.list_snapshots() == []
    assert not pool.settings.snapshots_dir.exists() or not any(
        pool.settings.snapshots_dir.iterdir()
    )
    assert pool.store.get(source.id).state is State.IN_USE


def test_past_the_disk_budget_a_snapshot_names_what_to_delete(tmp_path: Path) -> None:
    pool = fake_pool(tmp_path, COPPICE_SNAPSHOT_DISK_MB="1")
    source = running(pool, {"/big": "x" * 700_000})
    big = snapshots(pool).take(source.id, "t", None, None)
    with pytest.raises(DiskBudgetExceeded) as info:
        snapshots(pool).take(source.id, "t", None, None)
    assert f"snapshot {big.id}" in str(info.value)
    assert "snapshot_disk_mb" in str(info.value)
    assert len(pool.store.list_snapshots()) == 1
    assert pool.store.get(source.id).state is State.IN_USE  # refused before it was held
    snapshots(pool).delete(big)
    assert not Path(big.path).exists() and pool.store.list_snapshots() == []
    snapshots(pool).take(source.id, "t", None, None)  # room again


# -- forks --------------------------------------------------------------------------------------


def test_a_fork_starts_each_from_one_capture_and_deletes_it(pool: FakePool) -> None:
    source = running(pool)
    pool.fake.failing_spawns = 1  # one of the three cannot start
    outcomes = snapshots(pool).fork(source.id, "t", [sandbox_record() for _ in range(3)])
    started = [o.entry for o in outcomes if o.entry is not None]
    failed = [o.error for o in outcomes if o.error is not None]
    assert len(started) == 2 and len(failed) == 1 and "as asked" in str(failed[0])
    assert len({e.id for e in started} | {source.id}) == 3
    for e in started:
        assert pool.fake.sandboxes[e.id].files == pool.fake.sandboxes[source.id].files
        assert pool.fake.sandboxes[e.id].memory == {"x": "42"}
        assert pool.store.get(e.id).state is State.IN_USE
    assert pool.store.get(source.id).state is State.IN_USE
    assert pool.fake.calls_for(source.id).count("snapshot") == 1
    assert pool.store.list_snapshots() == []  # the capture went with the fork
    assert not any(pool.settings.snapshots_dir.iterdir())


# -- the files-only pause -------------------------------------------------------------------------


def test_a_files_only_pause_stops_processes_and_resume_starts_them_on_the_files(
    pool: FakePool,
) -> None:
    source = running(pool)
    pool.controller.pause_files_entry(source.id)
    handed = pool.store.get_sandbox(source.id)
    assert handed is not None and handed.entry.state is State.PAUSED_FILES
    assert handed.sandbox.kept_bytes > 0
    assert [h.id for h in pool.store.disk_holders()] == [source.id]
    assert not pool.fake.sandboxes[source.id].alive

    resumed = pool.controller.resume_entry(source.id)
    assert resumed.state is State.IN_USE and resumed.id == source.id
    sandbox = pool.fake.sandboxes[source.id]
    assert sandbox.alive and sandbox.boots == 2
    assert sandbox.files == {"/home/user/a.txt": "hello"} and sandbox.memory == {}
    calls = pool.fake.calls_for(source.id)
    assert calls[-3:] == ["stop_processes", "start_processes", "wait_ready"]
    assert pool.store.disk_holders() == []


def test_a_resume_that_cannot_start_stays_paused_with_its_files(pool: FakePool) -> None:
    source = running(pool)
    pool.controller.pause_files_entry(source.id)
    pool.fake.failing_starts = 1
    with pytest.raises(SubstrateError, match="still paused"):
        pool.controller.resume_entry(source.id)
    assert pool.store.get(source.id).state is State.PAUSED_FILES
    assert pool.controller.resume_entry(source.id).state is State.IN_USE


def test_a_files_only_pause_past_the_budget_is_refused_and_keeps_running(
    tmp_path: Path,
) -> None:
    pool = fake_pool(tmp_path, COPPICE_SNAPSHOT_DISK_MB="0")
    source = running(pool)
    with pytest.raises(DiskBudgetExceeded, match="files-only pause"):
        pool.controller.pause_files_entry(source.id)
    assert pool.store.get(source.id).state is State.IN_USE
    assert pool.fake.sandboxes[source.id].alive


# -- reconcile ------------------------------------------------------------------------------------


def test_a_host_reboot_keeps_paused_sandboxes_and_buries_running_ones(pool: FakePool) -> None:
    pool.fake.persistence = JAIL_LIKE  # a freeze does not outlive the reboot
    files_only, frozen, busy = running(pool), running(pool), running(pool)
    pool.controller.pause_files_entry(files_only.id)
    pool.controller.pause_entry(frozen.id)
    pool.fake.reboot()

    report = pool.controller.reconcile()
    assert report.kept_paused == [frozen.id]
    assert pool.store.get(files_only.id).state is State.PAUSED_FILES
    assert pool.store.get(frozen.id).state is State.PAUSED_FILES
    assert pool.store.get_sandbox(busy.id) is None  # a running sandbox does not survive
    assert pool.store.get_tombstone(busy.id) is not None
    for kept in (files_only, frozen):
        woken = pool.controller.resume_entry(kept.id)
        assert woken.id == kept.id and woken.state is State.IN_USE
        assert pool.fake.sandboxes[kept.id].files == {"/home/user/a.txt": "hello"}


def test_a_reboot_keeps_a_memory_pause_where_the_substrate_keeps_it_on_disk(
    pool: FakePool,
) -> None:
    frozen = running(pool)
    pool.controller.pause_entry(frozen.id)
    pool.fake.reboot()
    assert pool.controller.reconcile().kept_paused == []
    assert pool.store.get(frozen.id).state is State.PAUSED
    pool.controller.resume_entry(frozen.id)
    assert pool.fake.sandboxes[frozen.id].memory == {"x": "42"}


def test_a_paused_sandbox_whose_files_are_gone_is_buried(pool: FakePool) -> None:
    source = running(pool)
    pool.controller.pause_files_entry(source.id)
    pool.fake.lose_files(source.id)
    pool.controller.reconcile()
    assert pool.store.get_sandbox(source.id) is None


def crashed_controller(pool: FakePool, tmp_path: Path) -> PoolController:
    """A second process on the same database, whose owner identity is not running: what it
    leaves in the middle of something is a crash's leftovers."""
    store = Store(tmp_path / "coppice.db", owner=GONE_OWNER)
    return PoolController(pool.settings, store, substrates={"fake": pool.fake})


def test_kill_9_in_the_middle_of_a_snapshot_leaves_nothing_half_made(
    pool: FakePool, tmp_path: Path
) -> None:
    source = running(pool)
    crashed = crashed_controller(pool, tmp_path)
    started = crashed.store.begin_capture(
        source.id, "t", "snapshot", "files", lambda i: pool.settings.snapshots_dir / i, 10, 1 << 30
    )
    directory = Path(started.snapshot.path)
    directory.mkdir(parents=True)
    (directory / "files.json").write_text("{partial")  # the driver was half-way through
    assert pool.store.get(source.id).state is State.SNAPSHOTTING

    report = pool.controller.reconcile()
    assert report.snapshots_removed == [started.snapshot.id]
    assert report.put_back == [source.id]
    assert pool.store.list_snapshots() == [] and not directory.exists()
    assert pool.store.get(source.id).state is State.IN_USE
    assert pool.fake.sandboxes[source.id].alive


def test_kill_9_in_the_middle_of_a_fork_leaves_nothing_half_made(
    pool: FakePool, tmp_path: Path
) -> None:
    source = running(pool)
    crashed = crashed_controller(pool, tmp_path)
    crashed.respawn = False
    capture = SnapshotController(crashed).take(source.id, "t", None, None, purpose="fork")
    template = crashed.store.get_template(TEMPLATE)
    (half,) = crashed._reserve(template, 1)
    handle = pool.fake.spawn_from_snapshot(crashed._spec(half, template), capture.artifact)  # type: ignore[arg-type]
    crashed.store.set_handle(half.id, handle)

    report = pool.controller.reconcile()
    assert report.snapshots_removed == [capture.id]
    # the half-started fork is torn down (and, as any lost warm, replaced in the pool)
    assert any(r.startswith(f"{half.id} -> ") for r in report.replaced)
    assert pool.store.list_snapshots() == [] and not Path(capture.path).exists()
    assert half.id not in pool.fake.sandboxes
    assert half.id not in {e.id for e in pool.store.list_entries()}
    assert pool.store.get(source.id).state is State.IN_USE


def test_reconcile_removes_a_snapshot_directory_no_row_names(pool: FakePool) -> None:
    stray = pool.settings.snapshots_dir / "snap-000000000000"
    stray.mkdir(parents=True)
    (stray / "files.json").write_text("{}")
    assert "snap-000000000000" in pool.controller.reconcile().leftovers_removed
    assert not stray.exists()


def test_a_snapshot_being_made_by_a_live_process_is_left_alone(pool: FakePool) -> None:
    source = running(pool)
    pool.store.begin_capture(
        source.id, "t", "snapshot", "files", lambda i: pool.settings.snapshots_dir / i, 1, 1 << 30
    )
    assert pool.controller.reconcile().snapshots_removed == []
    assert pool.store.get(source.id).state is State.SNAPSHOTTING


# -- drivers without the mechanism yet ------------------------------------------------------------


class NotYet(SnapshotsNotYet):
    name = "jail"


def test_a_driver_without_snapshots_refuses_each_by_name(tmp_path: Path) -> None:
    driver = NotYet()
    spec = SpawnSpec("e1", fake_pool(tmp_path).store.get_template(TEMPLATE), "", "", None)  # type: ignore[arg-type]
    for call in (
        lambda: driver.snapshot("e1", None, tmp_path, True),
        lambda: driver.footprint("e1", None, False),
        lambda: driver.stop_processes("e1", None),
        lambda: driver.start_processes(spec, None),
        lambda: driver.delete_snapshot(tmp_path),
    ):
        with pytest.raises(NotSupportedOnSubstrate, match="on the jail substrate"):
            call()
    assert driver.has_files("e1", None) is False
