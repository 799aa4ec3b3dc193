"""Reconcile's planning step: pure decisions from observations."""

from __future__ import annotations

import itertools

import pytest

from coppice.lifecycle import INTERRUPTIBLE_STATES, LIVE_STATES, TRANSIENT_STATES, State
from coppice.pool.reconcile import Observation, ReconcilePlan, SnapshotObservation, plan
from coppice.store.records import EntryRecord, SnapshotRecord

NOW = 10_000.0
_ids = itertools.count()


def entry(state: State, deadline: float | None = None, entry_id: str | None = None) -> EntryRecord:
    return EntryRecord(
        id=entry_id or f"e{next(_ids):04d}",
        template="py",
        substrate="jail",
        state=state,
        ip="10.78.0.50",
        hostname="cp-x",
        handle=None,
        owner_pid=123,
        owner_start=456,
        deadline=deadline,
        created_at=NOW - 100,
        updated_at=NOW - 100,
        ready_at=None,
        checked_out_at=None,
    )


def ob(e: EntryRecord, sandbox_alive: bool = True, owner_alive: bool = True) -> Observation:
    return Observation(e, sandbox_alive=sandbox_alive, owner_alive=owner_alive)


def test_nothing_to_do() -> None:
    result = plan([], set(), NOW)
    assert result == ReconcilePlan()
    assert result.empty


def test_healthy_entries_need_nothing() -> None:
    observations = [
        ob(entry(State.AVAILABLE)),
        ob(entry(State.IN_USE)),
        ob(entry(State.PAUSED)),
        ob(entry(State.WARMING, deadline=NOW + 50)),
        ob(entry(State.RETURNING, deadline=NOW + 50)),
        ob(entry(State.FAILED, deadline=NOW + 50)),
    ]
    host_ids = {o.entry.id for o in observations}
    assert plan(observations, host_ids, NOW).empty


@pytest.mark.parametrize("state", [State.AVAILABLE, State.IN_USE, State.PAUSED])
def test_live_entry_whose_sandbox_died_is_dead(state: State) -> None:
    e = entry(state)
    result = plan([ob(e, sandbox_alive=False)], {e.id}, NOW)
    assert result.dead == [e]
    assert result.orphaned == []
    assert not result.empty


@pytest.mark.parametrize("state", sorted(TRANSIENT_STATES))
def test_transient_entry_whose_owner_is_gone_is_orphaned(state: State) -> None:
    e = entry(state, deadline=NOW + 50)
    result = plan([ob(e, owner_alive=False)], {e.id}, NOW)
    assert result.orphaned == [e]
    assert result.dead == []


@pytest.mark.parametrize("state", sorted(TRANSIENT_STATES))
def test_transient_entry_past_its_deadline_is_orphaned(state: State) -> None:
    e = entry(state, deadline=NOW - 0.001)
    assert plan([ob(e)], {e.id}, NOW).orphaned == [e]


@pytest.mark.parametrize("state", sorted(TRANSIENT_STATES))
def test_deadline_is_exclusive_and_none_never_expires(state: State) -> None:
    at_deadline = entry(state, deadline=NOW)
    no_deadline = entry(state, deadline=None)
    result = plan([ob(at_deadline), ob(no_deadline)], set(), NOW)
    assert result.orphaned == []


def test_warming_entry_is_judged_by_its_owner_not_its_sandbox() -> None:
    # A warming sandbox is not answering yet; that alone must not make it dead.
    e = entry(State.WARMING, deadline=NOW + 50)
    result = plan([ob(e, sandbox_alive=False, owner_alive=True)], {e.id}, NOW)
    assert result.empty


@pytest.mark.parametrize("state", [State.RETURNING, State.FAILED])
def test_teardown_states_are_never_dead(state: State) -> None:
    e = entry(state, deadline=NOW + 50)
    assert plan([ob(e, sandbox_alive=False)], {e.id}, NOW).empty


def test_live_entry_with_dead_owner_but_live_sandbox_is_fine() -> None:
    e = entry(State.IN_USE)
    assert plan([ob(e, owner_alive=False)], {e.id}, NOW).empty


def test_leftover_host_objects_without_records_are_sorted() -> None:
    known = entry(State.AVAILABLE, entry_id="bbbb")
    result = plan([ob(known)], {"zzzz", "bbbb", "aaaa"}, NOW)
    assert result.leftovers == ["aaaa", "zzzz"]
    assert result.dead == result.orphaned == []


def test_records_without_host_objects_are_not_leftovers() -> None:
    e = entry(State.AVAILABLE)
    assert plan([ob(e)], set(), NOW).leftovers == []


def test_mixed_plan_keeps_observation_order() -> None:
    dead1 = entry(State.IN_USE)
    fine = entry(State.AVAILABLE)
    orphan = entry(State.RETURNING, deadline=NOW - 1)
    dead2 = entry(State.PAUSED)
    stuck = entry(State.WARMING, deadline=NOW + 10)
    observations = [
        ob(dead1, sandbox_alive=False),
        ob(fine),
        ob(orphan),
        ob(dead2, sandbox_alive=False),
        ob(stuck, owner_alive=False),
    ]
    result = plan(observations, {"stray", dead1.id}, NOW)
    assert result.dead == [dead1, dead2]
    assert result.orphaned == [orphan, stuck]
    assert result.leftovers == ["stray"]


def test_every_state_lands_in_at_most_one_bucket() -> None:
    for state, sandbox, owner, overdue, files in itertools.product(
        [s for s in State if s is not State.GONE],
        (True, False),
        (True, False),
        (True, False),
        (True, False),
    ):
        e = entry(state, deadline=NOW - 1 if overdue else NOW + 1)
        result = plan([Observation(e, sandbox, owner, files)], set(), NOW)
        buckets = (
            (e in result.dead)
            + (e in result.orphaned)
            + (e in result.kept)
            + (e in result.interrupted)
        )
        assert buckets <= 1
        if state in TRANSIENT_STATES:
            assert (e in result.orphaned) == (not owner or overdue)
        elif state in INTERRUPTIBLE_STATES:
            assert (e in result.interrupted) == (not owner or overdue)
        elif state is State.PAUSED_FILES:
            # it has no processes to be alive: only its files decide
            assert (e in result.dead) == (not files)
        elif state is State.PAUSED:
            assert (e in result.kept) == (not sandbox and files)
            assert (e in result.dead) == (not sandbox and not files)
        elif state in LIVE_STATES:
            assert (e in result.dead) == (not sandbox)


def test_a_reboot_keeps_paused_sandboxes_with_their_files_and_buries_running_ones() -> None:
    running = entry(State.IN_USE)
    frozen = entry(State.PAUSED)
    files_only = entry(State.PAUSED_FILES)
    frozen_no_files = entry(State.PAUSED)
    result = plan(
        [
            Observation(running, False, True, has_files=True),
            Observation(frozen, False, True, has_files=True),
            Observation(files_only, False, True, has_files=True),
            Observation(frozen_no_files, False, True, has_files=False),
        ],
        set(),
        NOW,
    )
    assert result.kept == [frozen]
    assert result.dead == [running, frozen_no_files]
    assert files_only not in result.dead


def snapshot(state: str, snapshot_id: str = "snap-1") -> SnapshotRecord:
    return SnapshotRecord(
        id=snapshot_id,
        name=None,
        tenant="t",
        source_id="e1",
        template="py",
        substrate="jail",
        purpose="snapshot",
        kind="files",
        size_bytes=1,
        path=f"/var/lib/coppice/snapshots/{snapshot_id}",
        state=state,
        created_at=NOW,
    )


def test_half_made_snapshots_of_a_gone_owner_are_removed_and_stray_directories_too() -> None:
    making_mine = snapshot("making", "snap-a")
    making_lost = snapshot("making", "snap-b")
    ready_lost = snapshot("ready", "snap-c")
    result = plan(
        [],
        set(),
        NOW,
        [
            SnapshotObservation(making_mine, owner_alive=True),
            SnapshotObservation(making_lost, owner_alive=False),
            SnapshotObservation(ready_lost, owner_alive=False),
        ],
        {"snap-a", "snap-b", "snap-c", "snap-stray"},
    )
    assert result.abandoned_snapshots == [making_lost]
    assert result.snapshot_leftovers == ["snap-stray"]
    assert not result.empty
