"""The admission queue: when a create stops waiting (pure `judge`), the order waiters are
served in, slots shared with refills, and a burst through the service that never sees a 429
while the host has room."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coppice.errors import PoolExhausted
from coppice.gateway.admission import AdmissionQueue, Refusal, SpawnSlots, judge
from coppice.lifecycle import State
from tests.waiting import wait_until

from .fake_pool import TEMPLATE, fake_pool, tenant
from .test_service_fake import Service, _request


def test_judge_waits_while_waiting_can_help() -> None:
    assert judge(0, 10, 0.0, 30.0, None) is None  # no rate seen yet: wait
    assert judge(5, 10, 2.0, 30.0, None) is None  # 3 s at 2/s


def test_judge_refuses_a_full_queue_a_full_host_and_a_hopeless_wait() -> None:
    full = judge(10, 10, 2.0, 30.0, None)
    assert full is not None and full.reason == "queue_full"
    host = judge(0, 10, 2.0, 30.0, "every one of the 200 jail addresses is taken")
    assert host == Refusal("at_capacity", 5.0, "every one of the 200 jail addresses is taken")
    late = judge(99, 1000, 2.0, 30.0, None)  # 50 s at 2/s
    assert late is not None and late.reason == "deadline" and late.retry_after_s == 50


def test_slots_go_to_requests_before_refills() -> None:
    waiting = [True]
    slots = SpawnSlots(1, held_back=lambda: waiting[0])
    assert not slots.try_for_refill()  # a create waits: the refill holds back
    assert slots.try_for_request()
    assert not slots.try_for_request()
    slots.release()
    waiting[0] = False
    assert slots.try_for_refill()


def test_waiters_are_served_first_come_first_served() -> None:
    queue = AdmissionQueue(queue_max=100)
    stock: list[int] = []
    served: list[int] = []
    lock = threading.Lock()

    def take() -> int | None:
        with lock:
            return stock.pop(0) if stock else None

    def waiter(n: int) -> None:
        got = queue.serve(TEMPLATE, 5.0, take, lambda: None, poll_s=0.01)
        assert not isinstance(got, Refusal)
        served.append(n)

    with ThreadPoolExecutor(5) as pool:
        for n in range(1, 6):
            pool.submit(waiter, n - 1)
            assert wait_until(functools.partial(lambda k: queue.waiting(TEMPLATE) == k, n))
        for i in range(1, 6):
            with lock:
                stock.append(i)
            queue.supplied()
            assert wait_until(functools.partial(lambda k: len(served) == k, i))
    assert served == [0, 1, 2, 3, 4]
    assert queue.waiting() == 0


def test_a_waiter_past_the_deadline_is_refused_with_retry_after() -> None:
    queue = AdmissionQueue(queue_max=100)
    got = queue.serve(TEMPLATE, 0.1, lambda: None, lambda: None, poll_s=0.01)
    assert isinstance(got, Refusal) and got.reason == "deadline" and got.retry_after_s >= 1


def test_a_burst_beyond_the_pool_and_the_slots_all_succeeds(tmp_path: Path) -> None:
    pool = fake_pool(tmp_path, COPPICE_SPAWN_SLOTS="2")
    pool.fake.on_wait_ready = lambda _: time.sleep(0.05)  # a start takes a moment
    svc = Service(pool, target=2)
    try:
        svc.keeper.start()
        assert wait_until(lambda: pool.controller.available_count(TEMPLATE) == 2)
        with ThreadPoolExecutor(20) as runner:
            futures = [
                runner.submit(svc.service.create, _request(), tenant(), None) for _ in range(20)
            ]
            ids = {f.result(30)[0].sandbox.id for f in futures}
        assert len(ids) == 20
        # The pool follows the burst: it is refilled to the burst's size, not to 2.
        assert svc.keeper.targets()[TEMPLATE] == 20
        assert wait_until(lambda: pool.controller.available_count(TEMPLATE) == 20)
    finally:
        svc.keeper.stop()


def test_a_full_host_answers_429_naming_the_limit(tmp_path: Path) -> None:
    pool = fake_pool(tmp_path, COPPICE_MAX_SANDBOXES="1")
    svc = Service(pool, target=0)
    try:
        svc.service.create(_request(), tenant(), None)
        with pytest.raises(PoolExhausted) as info:
            svc.service.create(_request(), tenant(), None)
        assert "max_sandboxes" in str(info.value) and info.value.retry_after_s >= 1
        assert [e.state for e in pool.store.list_entries()] == [State.IN_USE]
    finally:
        svc.keeper.stop()
