"""PoolController against the fake substrate: exact sequences of driver calls for warm,
checkout, return, death, failure, reconcile and drain, and the races that otherwise need
real jails to reach."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coppice.errors import PoolExhausted, SubstrateError
from coppice.lifecycle import State

from .fake_pool import TEMPLATE, fake_pool, sandbox_record


def test_warm_spawns_waits_and_pauses_each_entry(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)
    report = p.controller.warm(TEMPLATE, 3)
    assert not report.failures and len(report.started) == 3
    for e in report.started:
        assert p.fake.calls_for(e.id) == ["spawn", "wait_ready", "pause"]
        assert p.store.get(e.id).state is State.AVAILABLE
        assert p.fake.sandboxes[e.id].paused
    assert len({e.ip for e in report.started}) == 3  # one address each, from the fake's range
    assert all(e.ip.startswith("10.254.0.") for e in report.started)


def test_checkout_resumes_and_return_destroys_and_replaces(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)
    p.controller.warm(TEMPLATE, 1)
    entry = p.controller.checkout(TEMPLATE)
    assert p.fake.calls_for(entry.id) == ["spawn", "wait_ready", "pause", "resume"]
    assert p.store.get(entry.id).state is State.IN_USE
    with pytest.raises(PoolExhausted):
        p.controller.checkout(TEMPLATE)
    replacement = p.controller.return_entry(entry.id)
    assert p.fake.calls_for(entry.id)[-1] == "destroy"
    assert replacement is not None and replacement.state is State.AVAILABLE
    assert entry.id not in p.fake.sandboxes


def test_a_dead_entry_is_never_handed_out(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)
    p.controller.warm(TEMPLATE, 2)
    # The longest-waiting entry goes first; it died while paused.
    first, second = sorted(p.store.list_entries(), key=lambda e: (e.ready_at or 0, e.id))
    p.fake.kill(first.id)
    got = p.controller.checkout(TEMPLATE)
    assert got.id == second.id
    assert p.fake.calls_for(first.id)[-1] == "destroy"
    # ...and it was replaced (the controller respawns unless a keeper does).
    assert p.controller.pool_size(TEMPLATE) == 1


def test_a_failed_spawn_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)
    p.fake.failing_spawns = 1
    report = p.controller.warm(TEMPLATE, 2)
    assert len(report.started) == 1 and len(report.failures) == 1
    assert "failed (as asked)" in report.failures[0]
    assert [e.id for e in p.store.list_entries()] == [report.started[0].id]
    assert set(p.fake.sandboxes) == {report.started[0].id}


def test_an_entry_that_never_answers_fails_without_a_leak(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)

    def hold(entry_id: str) -> None:
        p.fake.never_ready.add(entry_id)

    p.fake.on_wait_ready = hold
    report = p.controller.warm(TEMPLATE, 1)
    assert report.started == [] and "never answered" in report.failures[0]
    assert p.store.list_entries() == [] and p.fake.sandboxes == {}


def test_reconcile_replaces_the_dead_and_removes_leftovers(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)
    victim, keeper = p.controller.warm(TEMPLATE, 2).started
    p.fake.kill(victim.id)
    p.fake.leave_behind("strayentry")
    report = p.controller.reconcile()
    assert len(report.replaced) == 1 and report.replaced[0].startswith(victim.id)
    assert report.leftovers_removed == ["strayentry"]
    assert "strayentry" not in p.fake.sandboxes
    assert {e.id for e in p.store.list_entries()} - {keeper.id} != set()
    assert p.controller.reconcile().changed is False  # a second pass finds nothing


def test_drain_leaves_nothing(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)
    p.controller.warm(TEMPLATE, 3)
    p.controller.checkout(TEMPLATE)
    assert p.controller.drain(TEMPLATE) == 3
    assert p.store.list_entries() == [] and p.fake.host_objects().all_ids() == set()


def test_a_cold_start_hands_out_with_a_lifetime_from_now(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)
    # Asked for 2 s of life ten seconds ago: the start itself took that long.
    asked = sandbox_record(timeout_s=2.0, started_at=time.time() - 10, end_at=time.time() - 8)
    entry = p.controller.start_cold(TEMPLATE, asked)
    handed = p.store.get_sandbox(entry.id)
    assert handed is not None and handed.entry.state is State.IN_USE
    assert handed.sandbox.end_at > time.time() + 1
    # Never paused, never available: nobody else could have checked it out meanwhile.
    assert p.fake.calls_for(entry.id) == ["spawn", "wait_ready", "resume"]
    assert p.store.expired_sandboxes(time.time()) == []


def test_a_cold_start_drained_while_starting_is_not_handed_out(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)

    def drain_meanwhile(entry_id: str) -> None:
        p.controller.drain(TEMPLATE)

    p.fake.on_wait_ready = drain_meanwhile
    with pytest.raises(SubstrateError, match="cancelled"):
        p.controller.start_cold(TEMPLATE, sandbox_record())
    assert p.store.list_entries() == [] and p.fake.sandboxes == {}


def test_pause_and_resume_reach_the_driver_with_the_handle(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)
    p.controller.warm(TEMPLATE, 1)
    entry = p.controller.checkout(TEMPLATE, sandbox_record())
    p.controller.pause_entry(entry.id)
    assert p.fake.sandboxes[entry.id].paused
    p.controller.resume_entry(entry.id)
    assert not p.fake.sandboxes[entry.id].paused
    handle = p.store.get(entry.id).handle
    assert handle is not None and p.fake.agent_address(handle) == (entry.ip, 49983)


def test_host_set_up_runs_once_not_per_refill_and_again_after_a_failure(tmp_path: Path) -> None:
    p = fake_pool(tmp_path)

    def set_ups() -> int:
        return sum(1 for call, _ in p.fake.calls if call == "prepare_host")

    p.controller.warm(TEMPLATE, 1)
    p.controller.warm(TEMPLATE, 1)
    assert set_ups() == 1
    p.fake.failing_spawns = 1
    p.controller.warm(TEMPLATE, 1)  # fails: the host may need repairing
    p.controller.warm(TEMPLATE, 1)
    assert set_ups() == 2
