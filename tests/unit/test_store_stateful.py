"""A model-based test of the SQLite store: random sequences of pool operations on a real db."""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from coppice.errors import CapacityExceeded, EntryNotFound, IllegalTransition, PoolExhausted
from coppice.host.processes import ProcessIdentity
from coppice.lifecycle import (
    HANDED_OUT_STATES,
    INTERRUPTIBLE_STATES,
    Action,
    Event,
    State,
    transition,
)
from coppice.store.store import Store

NETWORK = ipaddress.IPv4Network("10.78.0.0/24")
ADDRESSES = [NETWORK.network_address + i for i in range(50, 62)]  # 12 addresses
TEMPLATES = ("alpha", "beta")
SUBSTRATE = "jail"
#: every state of a sandbox its user holds (paused on disk, mid-capture, resuming included)
HANDED_OUT = tuple(HANDED_OUT_STATES)

templates = st.sampled_from(TEMPLATES)


class StoreMachine(RuleBasedStateMachine):
    entries = Bundle("entries")

    def __init__(self) -> None:
        super().__init__()
        self.tmpdir = tempfile.mkdtemp(prefix="coppice-store-")
        self.store = Store(
            Path(self.tmpdir) / "state" / "coppice.db",
            owner=ProcessIdentity(os.getpid(), 12345),
        )
        #: entry id -> (template, state), the model the store must agree with
        self.model: dict[str, tuple[str, State]] = {}
        #: ids handed out by checkout and not yet given back (returned, died, drained)
        self.in_use: set[str] = set()

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    def ids_in(self, *states: State) -> list[str]:
        # Model (creation) order, not sorted: ids are random, and hypothesis needs the same
        # draws to pick the same entries when it replays or shrinks a run.
        return [i for i, (_, s) in self.model.items() if s in states]

    def expect(self, entry_id: str, event: Event) -> None:
        """Apply `event` to the store and to the model; both must agree on the outcome."""
        if entry_id not in self.model:
            with pytest.raises(EntryNotFound):
                self.store.apply(entry_id, event)
            return
        template, state = self.model[entry_id]
        try:
            step = transition(entry_id, state, event)
        except IllegalTransition:
            with pytest.raises(IllegalTransition):
                self.store.apply(entry_id, event)
            assert self.store.get(entry_id).state is state
            return
        applied = self.store.apply(entry_id, event)
        assert applied.entry.id == entry_id
        assert applied.entry.state is step.state
        assert applied.actions == step.actions
        if step.state is State.GONE:
            del self.model[entry_id]
            with pytest.raises(EntryNotFound):
                self.store.get(entry_id)
        else:
            self.model[entry_id] = (template, step.state)
            assert self.store.get(entry_id).state is step.state
        if event in (Event.CHECKOUT, Event.HAND_OUT):
            assert entry_id not in self.in_use
            self.in_use.add(entry_id)
        if step.state not in HANDED_OUT:
            self.in_use.discard(entry_id)

    # -- rules ------------------------------------------------------------------------------

    @initialize()
    def empty_at_start(self) -> None:
        assert self.store.list_entries() == []

    @rule(target=entries, template=templates, count=st.integers(1, 5))
    def reserve(self, template: str, count: int) -> object:
        held_before = {e.ip for e in self.store.list_entries()}
        if len(self.model) + count > len(ADDRESSES):
            with pytest.raises(CapacityExceeded):
                self.store.reserve(template, SUBSTRATE, count, ADDRESSES, "cp")
            assert {e.ip for e in self.store.list_entries()} == held_before
            event("reserve: capacity exceeded")
            return multiple()
        records = self.store.reserve(template, SUBSTRATE, count, ADDRESSES, "cp")
        assert len(records) == count
        ips = [r.ip for r in records]
        assert len(set(ips)) == count
        assert not set(ips) & held_before
        assert all(ipaddress.IPv4Address(ip) in ADDRESSES for ip in ips)
        for r in records:
            assert r.template == template
            assert r.substrate == SUBSTRATE
            assert r.state is State.WARMING
            assert r.hostname == f"cp-{r.id}"
            assert r.deadline is not None
            assert r.ready_at is None
            assert r.checked_out_at is None
            assert r.id not in self.model
            self.model[r.id] = (template, State.WARMING)
        return multiple(*(r.id for r in records))

    @precondition(lambda self: bool(self.ids_in(State.WARMING)))
    @rule(data=st.data())
    def ready(self, data: st.DataObject) -> None:
        entry_id = data.draw(st.sampled_from(self.ids_in(State.WARMING)))
        self.expect(entry_id, Event.READY)
        record = self.store.get(entry_id)
        assert record.ready_at is not None
        assert record.deadline is None

    @precondition(lambda self: bool(self.ids_in(State.WARMING)))
    @rule(data=st.data())
    def hand_out_cold(self, data: st.DataObject) -> None:
        """A cold start: its own warming entry goes straight to its sandbox, so no checkout
        (which only takes available entries) can ever race it."""
        self.expect(data.draw(st.sampled_from(self.ids_in(State.WARMING))), Event.HAND_OUT)

    @precondition(lambda self: bool(self.ids_in(State.WARMING)))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        self.expect(data.draw(st.sampled_from(self.ids_in(State.WARMING))), Event.FAIL)

    @rule(template=templates)
    def checkout(self, template: str) -> None:
        self.check_out(template)

    @precondition(lambda self: bool(self.ids_in(State.AVAILABLE)))
    @rule(data=st.data())
    def checkout_where_available(self, data: st.DataObject) -> None:
        """The same as `checkout`, steered to a template that has something to hand out."""
        filled = [
            t for t in TEMPLATES if any(self.model[i][0] == t for i in self.ids_in(State.AVAILABLE))
        ]
        self.check_out(data.draw(st.sampled_from(filled)))

    def check_out(self, template: str) -> None:
        available = {
            i for i, (t, s) in self.model.items() if t == template and s is State.AVAILABLE
        }
        if not available:
            with pytest.raises(PoolExhausted) as info:
                self.store.checkout(template)
            assert info.value.template == template
            event("checkout: pool exhausted")
            return
        waiting = {e.id: e for e in self.store.list_entries(template)}
        applied = self.store.checkout(template)
        got = applied.entry
        # The central promise: nobody else holds what checkout hands out.
        assert got.id not in self.in_use
        assert got.id in available
        assert got.template == template
        assert got.state is State.IN_USE
        assert got.checked_out_at is not None
        assert applied.actions == (Action.RESUME,)
        # longest-waiting first
        ready_at = waiting[got.id].ready_at
        assert ready_at is not None
        for other in available - {got.id}:
            other_ready = waiting[other].ready_at
            assert other_ready is not None
            assert ready_at <= other_ready
        self.in_use.add(got.id)
        self.model[got.id] = (template, State.IN_USE)
        event(f"checkout: handed out with {len(available) - 1} others waiting")

    @precondition(lambda self: bool(self.ids_in(State.IN_USE)))
    @rule(data=st.data())
    def pause(self, data: st.DataObject) -> None:
        self.expect(data.draw(st.sampled_from(self.ids_in(State.IN_USE))), Event.PAUSE)

    @precondition(lambda self: bool(self.ids_in(State.PAUSED)))
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        self.expect(data.draw(st.sampled_from(self.ids_in(State.PAUSED))), Event.RESUME)

    @precondition(lambda self: bool(self.ids_in(*HANDED_OUT)))
    @rule(data=st.data())
    def return_(self, data: st.DataObject) -> None:
        entry_id = data.draw(st.sampled_from(self.ids_in(*HANDED_OUT)))
        held = self.model[entry_id][1]
        self.expect(entry_id, Event.RETURN)
        # A sandbox mid-capture or mid-resume is not returned (its kill answers 409).
        assert (entry_id in self.in_use) == (held in INTERRUPTIBLE_STATES)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def died(self, data: st.DataObject) -> None:
        self.expect(data.draw(st.sampled_from(list(self.model))), Event.DIED)

    @precondition(lambda self: bool(self.ids_in(State.RETURNING, State.FAILED)))
    @rule(data=st.data())
    def destroyed(self, data: st.DataObject) -> None:
        entry_id = data.draw(st.sampled_from(self.ids_in(State.RETURNING, State.FAILED)))
        self.expect(entry_id, Event.DESTROYED)
        assert entry_id not in self.model

    @rule(template=templates)
    def drain(self, template: str) -> None:
        drained = self.store.list_entries(template)
        event(f"drain: {min(len(drained), 3)}+ entries")
        for record in drained:
            self.expect(record.id, Event.DRAIN)
            self.expect(record.id, Event.DESTROYED)
        assert self.store.list_entries(template) == []
        assert all(t != template for t, _ in self.model.values())

    @rule(entry_id=entries, event=st.sampled_from(Event))
    def any_event(self, entry_id: str, event: Event) -> None:
        """Any event on any id ever reserved, gone or not: store and table must agree."""
        self.expect(entry_id, event)

    @rule(entry_id=consumes(entries))
    def forgotten_ids_stay_gone(self, entry_id: str) -> None:
        if entry_id not in self.model:
            with pytest.raises(EntryNotFound):
                self.store.get(entry_id)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        rows = self.store.list_entries()
        assert {r.id: (r.template, r.state) for r in rows} == self.model

    @invariant()
    def no_address_is_held_twice(self) -> None:
        ips = [r.ip for r in self.store.list_entries()]
        assert len(ips) == len(set(ips))
        assert len(ips) <= len(ADDRESSES)

    @invariant()
    def handed_out_entries_are_in_use_or_paused(self) -> None:
        assert self.in_use == set(self.ids_in(*HANDED_OUT))


StoreMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
TestStoreMachine = StoreMachine.TestCase
