"""Checkouts racing on one database file: SQLite's writer lock must serialise them."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coppice.errors import CapacityExceeded, PoolExhausted
from coppice.host.processes import ProcessIdentity
from coppice.lifecycle import Event, State
from coppice.store.store import Store

NETWORK = ipaddress.IPv4Network("10.78.0.0/24")
ADDRESSES = [NETWORK.network_address + i for i in range(50, 250)]
TEMPLATE = "py"
AVAILABLE = 24
WORKERS = 4
#: every worker tries this often, so together they ask for twice what there is
ATTEMPTS = 2 * AVAILABLE // WORKERS


def open_store(path: Path) -> Store:
    return Store(path, owner=ProcessIdentity(os.getpid(), 0))


def fill_pool(path: Path, count: int = AVAILABLE) -> set[str]:
    store = open_store(path)
    try:
        records = store.reserve(TEMPLATE, "jail", count, ADDRESSES, "cp")
        # a second template that must never be handed out by checkout(TEMPLATE)
        other = store.reserve("other", "jail", 3, ADDRESSES, "cp")
        for r in [*records, *other]:
            store.apply(r.id, Event.READY)
        return {r.id for r in records}
    finally:
        store.close()


def checkout_loop(store: Store, attempts: int) -> tuple[list[str], int]:
    got: list[str] = []
    exhausted = 0
    for _ in range(attempts):
        try:
            got.append(store.checkout(TEMPLATE).entry.id)
        except PoolExhausted:
            exhausted += 1
    return got, exhausted


def run_threads(target: Callable[[int], Any], count: int) -> list[Any]:
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            results[index] = target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert errors == []
    return results


def check_outcome(path: Path, expected: set[str], results: list[tuple[list[str], int]]) -> None:
    ids = [i for got, _ in results for i in got]
    exhausted = sum(n for _, n in results)
    assert len(ids) == len(set(ids)), "an entry was handed out twice"
    assert set(ids) == expected
    assert len(ids) == AVAILABLE
    assert exhausted == WORKERS * ATTEMPTS - AVAILABLE
    store = open_store(path)
    try:
        states = {e.id: e.state for e in store.list_entries(TEMPLATE)}
        assert states == dict.fromkeys(expected, State.IN_USE)
        assert all(e.state is State.AVAILABLE for e in store.list_entries("other"))
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_threads_sharing_one_store_never_take_the_same_entry(tmp_path: Path) -> None:
    path = tmp_path / "coppice.db"
    expected = fill_pool(path)
    store = open_store(path)  # one Store, one connection per thread
    barrier = threading.Barrier(WORKERS)

    def work(_: int) -> tuple[list[str], int]:
        barrier.wait(timeout=30)
        try:
            return checkout_loop(store, ATTEMPTS)
        finally:
            store.close()  # closes this thread's connection only

    results = run_threads(work, WORKERS)
    store.close()
    check_outcome(path, expected, results)


@pytest.mark.timeout(120)
def test_threads_with_their_own_store_never_take_the_same_entry(tmp_path: Path) -> None:
    path = tmp_path / "coppice.db"
    expected = fill_pool(path)
    barrier = threading.Barrier(2)

    def work(_: int) -> tuple[list[str], int]:
        store = open_store(path)
        barrier.wait(timeout=30)
        try:
            return checkout_loop(store, AVAILABLE)
        finally:
            store.close()

    results = run_threads(work, 2)
    ids = [i for got, _ in results for i in got]
    assert sorted(ids) == sorted(expected)
    assert sum(n for _, n in results) == AVAILABLE


def _process_worker(path: str, barrier: Any, queue: Any) -> None:
    try:
        store = open_store(Path(path))
        barrier.wait(30)
        queue.put(("ok", checkout_loop(store, ATTEMPTS)))
        store.close()
    except BaseException as exc:
        queue.put(("error", repr(exc)))


@pytest.mark.timeout(120)
def test_processes_never_take_the_same_entry(tmp_path: Path) -> None:
    path = tmp_path / "coppice.db"
    expected = fill_pool(path)  # closes its connection: none may cross the fork
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(str(path), barrier, queue))
        for _ in range(WORKERS)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [queue.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    errors = [detail for kind, detail in outcomes if kind != "ok"]
    assert errors == []
    results = [(list(got), int(n)) for _, (got, n) in outcomes]
    check_outcome(path, expected, results)


@pytest.mark.timeout(120)
def test_concurrent_reserves_never_share_an_address(tmp_path: Path) -> None:
    path = tmp_path / "coppice.db"
    addresses = ADDRESSES[:20]
    store = open_store(path)
    barrier = threading.Barrier(WORKERS)

    def work(_: int) -> tuple[list[str], int]:
        barrier.wait(timeout=30)
        ips: list[str] = []
        refused = 0
        try:
            for _ in range(4):
                try:
                    ips += [r.ip for r in store.reserve(TEMPLATE, "jail", 2, addresses, "cp")]
                except CapacityExceeded:
                    refused += 1
            return ips, refused
        finally:
            store.close()

    results = run_threads(work, WORKERS)
    store.close()
    ips = [ip for got, _ in results for ip in got]
    # 4 workers x 4 tries x 2 addresses = 32 wanted, 20 there: exactly 10 reserves succeed
    assert len(ips) == len(set(ips)) == len(addresses)
    assert sum(n for _, n in results) == WORKERS * 4 - len(addresses) // 2
    store = open_store(path)
    try:
        assert sorted(e.ip for e in store.list_entries()) == sorted(str(a) for a in addresses)
    finally:
        store.close()


def _open_worker(path: str, barrier: Any, queue: Any) -> None:
    try:
        barrier.wait(30)
        store = open_store(Path(path))
        store.list_entries()
        store.close()
        queue.put("ok")
    except BaseException as exc:
        queue.put(repr(exc))


@pytest.mark.timeout(120)
def test_processes_opening_a_fresh_database_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures: list[str] = []
    for trial in range(20):
        path = tmp_path / f"fresh-{trial}.db"
        barrier = ctx.Barrier(8)
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_open_worker, args=(str(path), barrier, queue)) for _ in range(8)
        ]
        for p in procs:
            p.start()
        try:
            failures += [r for r in (queue.get(timeout=60) for _ in procs) if r != "ok"]
        finally:
            for p in procs:
                p.join(timeout=30)
    assert failures == []
