"""Deciding what reconcile must fix, from observations alone (no I/O here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coppice.lifecycle import INTERRUPTIBLE_STATES, LIVE_STATES, TRANSIENT_STATES, State
from coppice.store.records import EntryRecord, SnapshotRecord


@dataclass(frozen=True)
class Observation:
    entry: EntryRecord
    #: the sandbox's own processes are running
    sandbox_alive: bool
    #: the process that owns the entry's current transient state is running
    owner_alive: bool
    #: its kept files are on disk (asked only of paused sandboxes whose processes are gone)
    has_files: bool = False


@dataclass(frozen=True)
class SnapshotObservation:
    snapshot: SnapshotRecord
    #: the process that is making it (or forking from it) is running
    owner_alive: bool


@dataclass(frozen=True)
class ReconcilePlan:
    #: entries whose sandbox is gone (reboot, kill -9): tear down what is left and replace them
    dead: list[EntryRecord] = field(default_factory=list)
    #: entries stuck in a transient state whose owner is gone or whose deadline passed
    orphaned: list[EntryRecord] = field(default_factory=list)
    #: entry ids that own host objects but have no record
    leftovers: list[str] = field(default_factory=list)
    #: frozen sandboxes whose processes are gone but whose files are kept (a host reboot):
    #: kept as files-only pauses, not buried
    kept: list[EntryRecord] = field(default_factory=list)
    #: sandboxes left resuming or being captured by a process that is gone: put back as
    #: they were (paused with their files, or running)
    interrupted: list[EntryRecord] = field(default_factory=list)
    #: snapshots (and forks' captures) a crash left half-made: their files and rows go
    abandoned_snapshots: list[SnapshotRecord] = field(default_factory=list)
    #: snapshot directories on disk that no row names
    snapshot_leftovers: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.dead
            or self.orphaned
            or self.leftovers
            or self.kept
            or self.interrupted
            or self.abandoned_snapshots
            or self.snapshot_leftovers
        )


def plan(
    observations: list[Observation],
    host_ids: set[str],
    now: float,
    snapshots: Sequence[SnapshotObservation] = (),
    snapshot_dirs: set[str] | None = None,
) -> ReconcilePlan:
    """`host_ids` and `snapshot_dirs` must be read *before* the records: a record always
    precedes its objects."""
    decided = ReconcilePlan()
    for ob in observations:
        e = ob.entry
        overdue = e.deadline is not None and now > e.deadline
        if e.state in TRANSIENT_STATES:
            if not ob.owner_alive or overdue:
                decided.orphaned.append(e)
        elif e.state in INTERRUPTIBLE_STATES:
            if not ob.owner_alive or overdue:
                decided.interrupted.append(e)
        elif e.state is State.PAUSED_FILES:
            if not ob.has_files:
                decided.dead.append(e)
        elif e.state in LIVE_STATES and not ob.sandbox_alive:
            if e.state is State.PAUSED and ob.has_files:
                decided.kept.append(e)
            else:
                decided.dead.append(e)
    known = {ob.entry.id for ob in observations}
    decided.leftovers.extend(sorted(host_ids - known))
    for seen in snapshots:
        if seen.snapshot.state == "making" and not seen.owner_alive:
            decided.abandoned_snapshots.append(seen.snapshot)
    if snapshot_dirs is not None:
        named = {s.snapshot.id for s in snapshots}
        decided.snapshot_leftovers.extend(sorted(snapshot_dirs - named))
    return decided
