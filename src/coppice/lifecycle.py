"""The rules of an entry's life, with no I/O.

`transition(state, event)` says what state follows and which side effects the controller must
perform once the new state is committed. Work that has to happen *before* a state becomes
visible to others is folded into the event's meaning instead: READY means "answering and
already paused", so no checkout can ever see an entry that a warm is still about to freeze.
A cold start is its own path, HAND_OUT, from warming straight to in use: the entry is never
available to anyone else, so no concurrent checkout can take it from the caller who started it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from coppice.errors import IllegalTransition


class State(enum.StrEnum):
    WARMING = "warming"  # resources being created, not yet answering
    AVAILABLE = "available"  # answering and paused, waiting for a checkout
    IN_USE = "in_use"  # handed out and running
    PAUSED = "paused"  # handed out, paused by its user
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
    DRAIN = "drain"
    DESTROYED = "destroyed"


class Action(enum.StrEnum):
    RESUME = "resume"
    PAUSE = "pause"
    DESTROY = "destroy"
    RESPAWN = "respawn"  # start a replacement so the pool keeps its size
    FORGET = "forget"  # delete the record, which frees its address


LIVE_STATES = frozenset({State.WARMING, State.AVAILABLE, State.IN_USE, State.PAUSED})
#: states a process is working on right now; their owner must be alive or the deadline near
TRANSIENT_STATES = frozenset({State.WARMING, State.RETURNING, State.FAILED})


@dataclass(frozen=True)
class Transition:
    state: State
    actions: tuple[Action, ...] = ()


_TABLE: dict[tuple[State, Event], Transition] = {
    (State.WARMING, Event.READY): Transition(State.AVAILABLE),
    (State.WARMING, Event.HAND_OUT): Transition(State.IN_USE),
    (State.WARMING, Event.FAIL): Transition(State.FAILED, (Action.DESTROY,)),
    (State.AVAILABLE, Event.CHECKOUT): Transition(State.IN_USE, (Action.RESUME,)),
    (State.IN_USE, Event.PAUSE): Transition(State.PAUSED, (Action.PAUSE,)),
    (State.PAUSED, Event.RESUME): Transition(State.IN_USE, (Action.RESUME,)),
    (State.IN_USE, Event.RETURN): Transition(State.RETURNING, (Action.DESTROY, Action.RESPAWN)),
    (State.PAUSED, Event.RETURN): Transition(State.RETURNING, (Action.DESTROY, Action.RESPAWN)),
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
}


def deadline_for(state: State, now: float) -> float | None:
    limit = STATE_DEADLINES_S.get(state)
    return None if limit is None else now + limit
