"""The pure transition table of an entry's life."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from coppice.errors import Conflict, IllegalTransition
from coppice.lifecycle import (
    HANDED_OUT_STATES,
    INTERRUPTIBLE_STATES,
    LIVE_STATES,
    STATE_DEADLINES_S,
    TRANSIENT_STATES,
    Action,
    Event,
    State,
    Transition,
    deadline_for,
    transition,
)

TEARDOWN_STATES = (State.RETURNING, State.FAILED)


def run(start: State, events: list[Event]) -> list[Transition]:
    steps = []
    state = start
    for event in events:
        step = transition("e1", state, event)
        steps.append(step)
        state = step.state
    return steps


def test_happy_path_from_warming_to_gone() -> None:
    steps = run(State.WARMING, [Event.READY, Event.CHECKOUT, Event.RETURN, Event.DESTROYED])
    assert steps == [
        Transition(State.AVAILABLE, ()),
        Transition(State.IN_USE, (Action.RESUME,)),
        Transition(State.RETURNING, (Action.DESTROY, Action.RESPAWN)),
        Transition(State.GONE, (Action.FORGET,)),
    ]


def test_pause_and_resume_while_in_use() -> None:
    steps = run(
        State.AVAILABLE,
        [Event.CHECKOUT, Event.PAUSE, Event.RESUME, Event.PAUSE, Event.RETURN, Event.DESTROYED],
    )
    assert [s.state for s in steps] == [
        State.IN_USE,
        State.PAUSED,
        State.IN_USE,
        State.PAUSED,
        State.RETURNING,
        State.GONE,
    ]
    # A user's pause is a suspension (which a driver may write to disk), not the pool's freeze.
    assert steps[1].actions == (Action.SUSPEND,)
    assert steps[2].actions == (Action.WAKE,)
    assert steps[4].actions == (Action.DESTROY, Action.RESPAWN)
    assert steps[5].actions == (Action.FORGET,)


def test_a_cold_start_goes_from_warming_straight_to_in_use() -> None:
    steps = run(State.WARMING, [Event.HAND_OUT, Event.PAUSE, Event.RESUME, Event.RETURN])
    assert steps[0] == Transition(State.IN_USE, ())  # running already: nothing to resume
    assert [s.state for s in steps[1:]] == [State.PAUSED, State.IN_USE, State.RETURNING]


@pytest.mark.parametrize("state", [s for s in State if s is not State.WARMING])
def test_only_a_warming_entry_is_handed_out_cold(state: State) -> None:
    if state is State.GONE:
        return
    with pytest.raises(IllegalTransition):
        transition("e1", state, Event.HAND_OUT)


def test_failed_warm_is_destroyed_and_not_replaced() -> None:
    steps = run(State.WARMING, [Event.FAIL, Event.DESTROYED])
    assert steps == [
        Transition(State.FAILED, (Action.DESTROY,)),
        Transition(State.GONE, (Action.FORGET,)),
    ]
    assert Action.RESPAWN not in steps[0].actions


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.AVAILABLE, Event.RETURN),
        (State.AVAILABLE, Event.READY),
        (State.AVAILABLE, Event.PAUSE),
        (State.AVAILABLE, Event.RESUME),
        (State.AVAILABLE, Event.DESTROYED),
        (State.WARMING, Event.CHECKOUT),
        (State.WARMING, Event.RETURN),
        (State.WARMING, Event.DESTROYED),
        (State.IN_USE, Event.CHECKOUT),
        (State.IN_USE, Event.READY),
        (State.IN_USE, Event.RESUME),
        (State.IN_USE, Event.DESTROYED),
        (State.PAUSED, Event.PAUSE),
        (State.PAUSED, Event.CHECKOUT),
        (State.RETURNING, Event.RETURN),
        (State.RETURNING, Event.CHECKOUT),
        (State.RETURNING, Event.READY),
        (State.FAILED, Event.READY),
        (State.FAILED, Event.RETURN),
        (State.GONE, Event.DESTROYED),
        (State.GONE, Event.DIED),
        (State.GONE, Event.DRAIN),
    ],
)
def test_illegal_transitions_raise(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition) as info:
        transition("abc123", state, event)
    err = info.value
    assert isinstance(err, Conflict)
    assert (err.entry_id, err.state, err.event) == ("abc123", state.value, event.value)
    assert "abc123" in str(err)


def test_ready_twice_is_illegal() -> None:
    first = transition("e1", State.WARMING, Event.READY)
    with pytest.raises(IllegalTransition):
        transition("e1", first.state, Event.READY)


def test_return_twice_is_illegal() -> None:
    returned = transition("e1", State.IN_USE, Event.RETURN)
    with pytest.raises(IllegalTransition):
        transition("e1", returned.state, Event.RETURN)


@pytest.mark.parametrize("state", sorted(LIVE_STATES))
def test_died_from_every_live_state_tears_down_and_respawns(state: State) -> None:
    assert transition("e1", state, Event.DIED) == Transition(
        State.RETURNING, (Action.DESTROY, Action.RESPAWN)
    )


@pytest.mark.parametrize("state", sorted(LIVE_STATES))
def test_drain_from_every_live_state_tears_down_without_respawn(state: State) -> None:
    assert transition("e1", state, Event.DRAIN) == Transition(State.RETURNING, (Action.DESTROY,))


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(TEARDOWN_STATES, (Event.DIED, Event.DRAIN)))
)
def test_interrupted_teardown_is_redone_in_place(state: State, event: Event) -> None:
    assert transition("e1", state, event) == Transition(state, (Action.DESTROY,))


@pytest.mark.parametrize("state", TEARDOWN_STATES)
def test_destroyed_after_teardown_forgets(state: State) -> None:
    assert transition("e1", state, Event.DESTROYED) == Transition(State.GONE, (Action.FORGET,))


def test_gone_accepts_no_event() -> None:
    for event in Event:
        with pytest.raises(IllegalTransition):
            transition("e1", State.GONE, event)


def test_every_state_but_gone_can_reach_gone() -> None:
    for state in State:
        if state is State.GONE:
            continue
        step = transition("e1", state, Event.DRAIN)
        final = transition("e1", step.state, Event.DESTROYED)
        assert final.state is State.GONE


def test_only_forgetting_transitions_end_in_gone() -> None:
    for state, event in itertools.product(State, Event):
        try:
            step = transition("e1", state, event)
        except IllegalTransition:
            continue
        assert (step.state is State.GONE) == (Action.FORGET in step.actions)


def test_respawn_only_follows_an_entry_leaving_the_pool_unasked() -> None:
    for state, event in itertools.product(State, Event):
        try:
            step = transition("e1", state, event)
        except IllegalTransition:
            continue
        if Action.RESPAWN in step.actions:
            assert event in (Event.RETURN, Event.DIED)
            assert Action.DESTROY in step.actions


def test_state_sets() -> None:
    assert State.GONE not in LIVE_STATES | TRANSIENT_STATES
    assert LIVE_STATES.intersection(TRANSIENT_STATES) == {State.WARMING}
    assert set(STATE_DEADLINES_S) == set(TRANSIENT_STATES | INTERRUPTIBLE_STATES)
    assert INTERRUPTIBLE_STATES <= HANDED_OUT_STATES <= LIVE_STATES


def test_deadline_for() -> None:
    assert deadline_for(State.WARMING, 1000.0) == 1000.0 + STATE_DEADLINES_S[State.WARMING]
    assert deadline_for(State.RETURNING, 0.0) == STATE_DEADLINES_S[State.RETURNING]
    for state in (State.AVAILABLE, State.IN_USE, State.PAUSED, State.PAUSED_FILES, State.GONE):
        assert deadline_for(state, 1000.0) is None
    assert deadline_for(State.SNAPSHOTTING, 0.0) == STATE_DEADLINES_S[State.SNAPSHOTTING]


# -- files-only pause, snapshots, forks ---------------------------------------------------------


def test_a_files_only_pause_stops_processes_and_its_resume_starts_them() -> None:
    steps = run(
        State.IN_USE,
        [Event.PAUSE_FILES, Event.RESUME, Event.READY, Event.PAUSE_FILES, Event.RETURN],
    )
    assert steps == [
        Transition(State.PAUSED_FILES, (Action.STOP_PROCESSES,)),
        Transition(State.RESUMING, (Action.START_PROCESSES,)),
        Transition(State.IN_USE, ()),
        Transition(State.PAUSED_FILES, (Action.STOP_PROCESSES,)),
        Transition(State.RETURNING, (Action.DESTROY, Action.RESPAWN)),
    ]


def test_a_resume_that_fails_leaves_the_files_paused_for_another_try() -> None:
    steps = run(State.PAUSED_FILES, [Event.RESUME, Event.FAIL, Event.RESUME, Event.READY])
    assert steps == [
        Transition(State.RESUMING, (Action.START_PROCESSES,)),
        Transition(State.PAUSED_FILES, (Action.STOP_PROCESSES,)),
        Transition(State.RESUMING, (Action.START_PROCESSES,)),
        Transition(State.IN_USE, ()),
    ]


def test_a_frozen_sandbox_that_lost_its_processes_is_kept_with_its_files() -> None:
    steps = run(State.PAUSED, [Event.PROCESSES_LOST, Event.RESUME, Event.READY])
    assert steps == [
        Transition(State.PAUSED_FILES, ()),
        Transition(State.RESUMING, (Action.START_PROCESSES,)),
        Transition(State.IN_USE, ()),
    ]


def test_a_capture_holds_the_source_and_always_thaws_it() -> None:
    steps = run(State.IN_USE, [Event.SNAPSHOT, Event.SNAPSHOT_DONE, Event.SNAPSHOT])
    assert steps == [
        Transition(State.SNAPSHOTTING, ()),
        Transition(State.IN_USE, (Action.END_CAPTURE,)),
        Transition(State.SNAPSHOTTING, ()),
    ]


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.SNAPSHOTTING, Event.RETURN),  # killed mid-capture: refused, not torn down
        (State.SNAPSHOTTING, Event.PAUSE),
        (State.SNAPSHOTTING, Event.PAUSE_FILES),
        (State.SNAPSHOTTING, Event.SNAPSHOT),
        (State.RESUMING, Event.RETURN),
        (State.RESUMING, Event.RESUME),
        (State.PAUSED, Event.SNAPSHOT),
        (State.PAUSED_FILES, Event.SNAPSHOT),
        (State.PAUSED_FILES, Event.PAUSE),
        (State.PAUSED_FILES, Event.PAUSE_FILES),
        (State.PAUSED, Event.PAUSE_FILES),
        (State.IN_USE, Event.PROCESSES_LOST),
        (State.AVAILABLE, Event.SNAPSHOT),
        (State.IN_USE, Event.SNAPSHOT_DONE),
    ],
)
def test_captures_and_files_only_pauses_refuse_what_does_not_fit(
    state: State, event: Event
) -> None:
    with pytest.raises(IllegalTransition):
        transition("e1", state, event)


@pytest.mark.parametrize("state", sorted(HANDED_OUT_STATES))
def test_every_handed_out_state_can_die_and_be_drained(state: State) -> None:
    assert transition("e1", state, Event.DIED).state is State.RETURNING
    assert transition("e1", state, Event.DRAIN).state is State.RETURNING


# -- the model: random event sequences against what a sandbox's owner may rely on ---------------


class LifecycleModel(RuleBasedStateMachine):
    """One entry driven by any event the table accepts. What must hold throughout: a frozen
    sandbox thaws only by RESUME or a capture's end; processes are started only on kept
    files; a sandbox leaves its hand-out only by being torn down; nothing follows GONE."""

    def __init__(self) -> None:
        super().__init__()
        self.state = State.WARMING
        #: the model's own view: are the processes stopped with the files kept?
        self.files_only = False
        self.handed_out_once = False
        self.trace: list[tuple[State, Event]] = []

    @rule(event=st.sampled_from(list(Event)))
    def send(self, event: Event) -> None:
        try:
            step = transition("e1", self.state, event)
        except IllegalTransition:
            return
        assert self.state is not State.GONE, "nothing follows GONE"
        before = self.state
        self.trace.append((before, event))
        if Action.START_PROCESSES in step.actions:
            assert self.files_only, self.trace
        if Action.STOP_PROCESSES in step.actions:
            self.files_only = True
        if step.state is State.PAUSED_FILES:
            self.files_only = True
        if step.state is State.IN_USE:
            self.files_only = False
        if before in HANDED_OUT_STATES:
            self.handed_out_once = True
            # leaving a hand-out happens only through a teardown
            if step.state not in HANDED_OUT_STATES:
                assert step.state is State.RETURNING and Action.DESTROY in step.actions
        if before is State.SNAPSHOTTING and step.state is State.IN_USE:
            assert Action.END_CAPTURE in step.actions  # never left frozen by a capture
        self.state = step.state

    @invariant()
    def handed_out_never_returns_to_the_pool(self) -> None:
        if self.handed_out_once:
            assert self.state not in (State.AVAILABLE, State.WARMING)

    @invariant()
    def a_files_only_pause_is_never_resumed_by_a_thaw(self) -> None:
        if self.state is State.PAUSED_FILES:
            assert transition("e1", State.PAUSED_FILES, Event.RESUME).actions == (
                Action.START_PROCESSES,
            )


TestLifecycleModel = LifecycleModel.TestCase
TestLifecycleModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
