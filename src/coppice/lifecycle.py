"""The rules of an entry's life, with no I/O.

`transition(state, event)` says what state follows and which side effects the controller must
perform once the new state is committed. Work that has to happen *before* a state becomes
visible to others is folded into the event's meaning instead: READY means "answering and
already paused", so no checkout can ever see an entry that a warm is still about to freeze.
A cold start is its own path, HAND_OUT, from warming straight to in use: the entry is never
available to anyone else, so no concurrent checkout can take it from the caller who started it.

A handed-out sandbox has two pauses. PAUSE suspends it with its memory and processes kept
(SUSPEND: a freeze in a jail, which lasts as long as the host runs; a VM's memory written to
disk and its QEMU ended, which outlives a reboot; WAKE undoes either). PAUSE_FILES stops
its processes and keeps only its files on disk, which a gateway restart and a host reboot
both leave in place, and a RESUME of that starts its processes again (RESUMING until they
answer). A snapshot or a fork of a running sandbox holds
it in SNAPSHOTTING while its state is captured, so no kill or pause can pull the sandbox out
from under the capture; either outcome, or a crash of the process taking it, puts it back to
running.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from coppice.errors import IllegalTransition


class State(enum.StrEnum):
    WARMING = "warming"  # resources being created, not yet answering
    AVAILABLE = "available"  # answering and paused, waiting for a checkout
    IN_USE = "in_use"  # handed out and running
    PAUSED = "paused"  # handed out, suspended by its user with its memory kept
    PAUSED_FILES = "paused_files"  # handed out, processes stopped, files kept on disk
    RESUMING = "resuming"  # handed out, processes starting again on its kept files
    SNAPSHOTTING = "snapshotting"  # handed out, its state being captured (a snapshot, a fork)
    RETURNING = "returning"  # being torn down
    FAILED = "failed"  # never became ready; being torn down, not replaced
    GONE = "gone"  # every host resource released; the record is deleted


class Event(enum.StrEnum):
    READY = "ready"
    HAND_OUT = "hand_out"  # a cold start: answering, running, and handed to its caller
    FAIL = "fail"
    CHECKOUT = "checkout"
    PAUSE = "pause"
    RESUME = "resume"
    RETURN = "return"
    DIED = "died"  # its processes (or the process that was warming it) are gone
    PAUSE_FILES = "pause_files"  # stop the processes, keep the files
    #: a frozen sandbox's processes are gone but its files are on disk (a host reboot): it is
    #: kept as a files-only pause rather than buried
    PROCESSES_LOST = "processes_lost"
    SNAPSHOT = "snapshot"  # start capturing a running sandbox
    SNAPSHOT_DONE = "snapshot_done"  # the capture finished, well or not
    DRAIN = "drain"
    DESTROYED = "destroyed"


class Action(enum.StrEnum):
    RESUME = "resume"
    PAUSE = "pause"
    DESTROY = "destroy"
    RESPAWN = "respawn"  # start a replacement so the pool keeps its size
    FORGET = "forget"  # delete the record, which frees its address
    SUSPEND = "suspend"  # a user's pause with memory kept (see the module's docstring)
    WAKE = "wake"  # undo SUSPEND
    STOP_PROCESSES = "stop_processes"  # end its processes, keep its files
    START_PROCESSES = "start_processes"  # start its processes again on its kept files
    #: release what a capture holds on its source (its frozen processes, a stopped VM),
    #: also when the process taking it died half-way
    END_CAPTURE = "end_capture"


#: states of an entry that some caller holds as its sandbox
HANDED_OUT_STATES = frozenset(
    {State.IN_USE, State.PAUSED, State.PAUSED_FILES, State.RESUMING, State.SNAPSHOTTING}
)
LIVE_STATES = frozenset({State.WARMING, State.AVAILABLE}) | HANDED_OUT_STATES
#: states a process is working on right now; their owner must be alive or the deadline near
TRANSIENT_STATES = frozenset({State.WARMING, State.RETURNING, State.FAILED})
#: handed-out states a process is working on: when their owner is lost, the sandbox is put
#: back as it was (a capture abandoned, a resume undone) instead of torn down
INTERRUPTIBLE_STATES = frozenset({State.RESUMING, State.SNAPSHOTTING})


@dataclass(frozen=True)
class Transition:
    state: State
    actions: tuple[Action, ...] = ()


_TABLE: dict[tuple[State, Event], Transition] = {
    (State.WARMING, Event.READY): Transition(State.AVAILABLE),
    (State.WARMING, Event.HAND_OUT): Transition(State.IN_USE),
    (State.WARMING, Event.FAIL): Transition(State.FAILED, (Action.DESTROY,)),
    (State.AVAILABLE, Event.CHECKOUT): Transition(State.IN_USE, (Action.RESUME,)),
    (State.IN_USE, Event.PAUSE): Transition(State.PAUSED, (Action.SUSPEND,)),
    (State.PAUSED, Event.RESUME): Transition(State.IN_USE, (Action.WAKE,)),
    (State.IN_USE, Event.RETURN): Transition(State.RETURNING, (Action.DESTROY, Action.RESPAWN)),
    (State.PAUSED, Event.RETURN): Transition(State.RETURNING, (Action.DESTROY, Action.RESPAWN)),
    (State.IN_USE, Event.PAUSE_FILES): Transition(State.PAUSED_FILES, (Action.STOP_PROCESSES,)),
    (State.PAUSED, Event.PROCESSES_LOST): Transition(State.PAUSED_FILES),
    (State.PAUSED_FILES, Event.RESUME): Transition(State.RESUMING, (Action.START_PROCESSES,)),
    (State.RESUMING, Event.READY): Transition(State.IN_USE),
    # Processes that did not come up are stopped again; the files stay for another try.
    (State.RESUMING, Event.FAIL): Transition(State.PAUSED_FILES, (Action.STOP_PROCESSES,)),
    (State.PAUSED_FILES, Event.RETURN): Transition(
        State.RETURNING, (Action.DESTROY, Action.RESPAWN)
    ),
    (State.IN_USE, Event.SNAPSHOT): Transition(State.SNAPSHOTTING),
    # A thaw whatever happened: a driver (or a crash of the process taking the snapshot) must
    # never leave the source frozen; thawing a running sandbox changes nothing.
    (State.SNAPSHOTTING, Event.SNAPSHOT_DONE): Transition(State.IN_USE, (Action.END_CAPTURE,)),
    (State.RETURNING, Event.DESTROYED): Transition(State.GONE, (Action.FORGET,)),
    (State.FAILED, Event.DESTROYED): Transition(State.GONE, (Action.FORGET,)),
}
for _s in LIVE_STATES:
    _TABLE[(_s, Event.DIED)] = Transition(State.RETURNING, (Action.DESTROY, Action.RESPAWN))
    _TABLE[(_s, Event.DRAIN)] = Transition(State.RETURNING, (Action.DESTROY,))
# A teardown that was interrupted (its owner died) is simply done again.
for _s in (State.RETURNING, State.FAILED):
    _TABLE[(_s, Event.DIED)] = Transition(_s, (Action.DESTROY,))
    _TABLE[(_s, Event.DRAIN)] = Transition(_s, (Action.DESTROY,))


def transition(entry_id: str, state: State, event: Event) -> Transition:
    try:
        return _TABLE[(state, event)]
    except KeyError:
        raise IllegalTransition(entry_id, state.value, event.value) from None


#: how long an entry may stay in a transient state before reconcile treats its owner as lost
STATE_DEADLINES_S: dict[State, float] = {
    State.WARMING: 120.0,
    State.RETURNING: 60.0,
    State.FAILED: 60.0,
    State.RESUMING: 120.0,
    # copying a large writable layer or a VM's memory out takes a while
    State.SNAPSHOTTING: 600.0,
}


def deadline_for(state: State, now: float) -> float | None:
    limit = STATE_DEADLINES_S.get(state)
    return None if limit is None else now + limit
