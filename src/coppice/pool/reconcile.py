"""Deciding what reconcile must fix, from observations alone (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from coppice.lifecycle import LIVE_STATES, TRANSIENT_STATES
from coppice.store.records import EntryRecord


@dataclass(frozen=True)
class Observation:
    entry: EntryRecord
    #: the sandbox's own processes are running
    sandbox_alive: bool
    #: the process that owns the entry's current transient state is running
    owner_alive: bool


@dataclass(frozen=True)
class ReconcilePlan:
    #: entries whose sandbox is gone (reboot, kill -9): tear down what is left and replace them
    dead: list[EntryRecord] = field(default_factory=list)
    #: entries stuck in a transient state whose owner is gone or whose deadline passed
    orphaned: list[EntryRecord] = field(default_factory=list)
    #: entry ids that own host objects but have no record
    leftovers: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.dead or self.orphaned or self.leftovers)


def plan(observations: list[Observation], host_ids: set[str], now: float) -> ReconcilePlan:
    """`host_ids` must be read *before* the records: a record always precedes its objects."""
    dead: list[EntryRecord] = []
    orphaned: list[EntryRecord] = []
    for ob in observations:
        e = ob.entry
        if e.state in TRANSIENT_STATES:
            overdue = e.deadline is not None and now > e.deadline
            if not ob.owner_alive or overdue:
                orphaned.append(e)
        elif e.state in LIVE_STATES and not ob.sandbox_alive:
            dead.append(e)
    known = {ob.entry.id for ob in observations}
    return ReconcilePlan(dead, orphaned, sorted(host_ids - known))
