"""A dead sandbox's tombstone is written in the transaction that applies its DIED, only for
sandboxes that were handed out, and pruned by age."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from coppice.lifecycle import Action, Event, State
from coppice.store.schema import MIGRATIONS
from coppice.store.store import Store

from .test_store_sandboxes import _sandbox, _store


def test_migration_6_makes_the_tombstones_table(tmp_path: Path) -> None:
    store = _store(tmp_path)
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 6
    columns = {r[1] for r in conn.execute("PRAGMA table_info(tombstones)")}
    assert {"id", "tenant", "template", "died_at", "reason", "detail", "log_tail"} <= columns


def test_bury_ends_the_sandbox_and_keeps_its_tombstone_at_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    entry = store.checkout("py", _sandbox(tenant="acme", access_token="secret")).entry
    buried = store.bury(entry, "out_of_memory", "out of memory: ...", ("a", "b"), died_at=123.0)
    assert buried is not None and buried.tombstone is not None
    assert buried.applied.entry.state is State.RETURNING
    assert Action.DESTROY in buried.applied.actions
    assert store.get_sandbox(entry.id) is None
    kept = store.get_tombstone(entry.id)
    assert kept == buried.tombstone
    assert (kept.tenant, kept.template, kept.access_token) == ("acme", "py", "secret")
    assert (kept.died_at, kept.reason, kept.log_tail) == (123.0, "out_of_memory", ("a", "b"))
    assert store.get_tombstone(entry.id, since=124.0) is None  # too old for the caller


def test_bury_of_a_changed_entry_does_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    entry = store.checkout("py", _sandbox()).entry
    store.apply(entry.id, Event.PAUSE)  # changed since `entry` was read
    assert store.bury(entry, "crashed", "x") is None
    assert store.get_tombstone(entry.id) is None
    assert store.get_sandbox(entry.id) is not None


def test_a_pool_entry_that_dies_leaves_no_tombstone(tmp_path: Path) -> None:
    store = _store(tmp_path)
    available = store.list_entries()[0]
    buried = store.bury(available, "crashed", "x")
    assert buried is not None and buried.tombstone is None
    assert store.get_tombstone(available.id) is None


def test_prune_forgets_old_deaths_only(tmp_path: Path) -> None:
    store: Store = _store(tmp_path)
    old, new = (store.checkout("py", _sandbox()).entry for _ in range(2))
    now = time.time()
    store.bury(old, "crashed", "x", died_at=now - 7200)
    store.bury(new, "crashed", "x", died_at=now)
    assert store.prune_tombstones(now - 3600) == 1
    assert store.get_tombstone(old.id) is None and store.get_tombstone(new.id) is not None
