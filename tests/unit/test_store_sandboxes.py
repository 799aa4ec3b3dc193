"""Sandbox records live and die with their entries, in the same transactions."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from pathlib import Path

import pytest

from coppice.errors import PoolExhausted
from coppice.host.processes import ProcessIdentity
from coppice.lifecycle import Event, State
from coppice.store.records import SandboxRecord
from coppice.store.store import Store

ADDRESSES = [ipaddress.IPv4Address("10.78.0.0") + i for i in range(50, 60)]


def _store(tmp_path: Path, ready: int = 2) -> Store:
    store = Store(tmp_path / "db", owner=ProcessIdentity(os.getpid(), 0))
    for e in store.reserve("py", "jail", ready, ADDRESSES, "py"):
        store.apply(e.id, Event.READY)
    return store


def _sandbox(**changes: object) -> SandboxRecord:
    base = SandboxRecord(
        id="",
        template_id="base",
        tenant="t",
        access_token="tok",
        env_vars={"A": "1"},
        metadata={"k": "v"},
        started_at=100.0,
        end_at=400.0,
        timeout_s=300.0,
        on_timeout="kill",
        auto_resume=False,
        idempotency_key=None,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_checkout_writes_the_sandbox_with_the_entry_id(tmp_path: Path) -> None:
    store = _store(tmp_path)
    entry = store.checkout("py", _sandbox()).entry
    handed = store.get_sandbox(entry.id)
    assert handed is not None
    assert handed.sandbox.id == entry.id and handed.entry.state is State.IN_USE
    assert handed.sandbox.env_vars == {"A": "1"} and handed.sandbox.metadata == {"k": "v"}


def test_a_failed_checkout_writes_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path, ready=0)
    with pytest.raises(PoolExhausted):
        store.checkout("py", _sandbox())
    assert store.list_sandboxes() == []


def test_pause_keeps_the_sandbox_and_return_ends_it(tmp_path: Path) -> None:
    store = _store(tmp_path)
    entry = store.checkout("py", _sandbox()).entry
    store.apply(entry.id, Event.PAUSE)
    handed = store.get_sandbox(entry.id)
    assert handed is not None and handed.entry.state is State.PAUSED
    store.apply(entry.id, Event.RESUME)
    store.apply(entry.id, Event.RETURN)
    assert store.get_sandbox(entry.id) is None
    assert store.get(entry.id).state is State.RETURNING


def test_expired_lists_only_running_sandboxes_past_their_end(tmp_path: Path) -> None:
    store = _store(tmp_path, ready=3)
    late = store.checkout("py", _sandbox(end_at=10.0)).entry
    paused = store.checkout("py", _sandbox(end_at=10.0)).entry
    store.checkout("py", _sandbox(end_at=1000.0))
    store.apply(paused.id, Event.PAUSE)
    assert [h.sandbox.id for h in store.expired_sandboxes(now=500.0)] == [late.id]
    store.set_sandbox_deadline(late.id, 2000.0, 60.0)
    assert store.expired_sandboxes(now=500.0) == []


def test_idempotency_keys_are_per_tenant(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = store.checkout("py", _sandbox(idempotency_key="k1")).entry
    found = store.find_idempotent("t", "k1")
    assert found is not None and found.sandbox.id == first.id
    assert store.find_idempotent("other", "k1") is None
    store.checkout("py", _sandbox(tenant="other", idempotency_key="k1"))
    assert len(store.list_sandboxes()) == 2
    assert [h.sandbox.tenant for h in store.list_sandboxes("other")] == ["other"]
