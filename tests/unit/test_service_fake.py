"""The gateway's SandboxService and PoolKeeper over the fake substrate: create from the pool
or cold, the 429 when neither may happen, idempotency, listing, kill, timeouts and refill."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coppice.config import Limits
from coppice.errors import PoolExhausted, SandboxNotFound
from coppice.gateway.catalog import TemplateCatalog
from coppice.gateway.keeper import PoolKeeper
from coppice.gateway.sandboxes import SandboxService
from coppice.gateway.wire import CreateRequest, parse_list_query
from coppice.lifecycle import State
from coppice.store.records import TemplatePolicy
from tests.waiting import wait_until

from .fake_pool import TEMPLATE, FakePool, fake_pool, tenant


def _request(**changes: object) -> CreateRequest:
    fields: dict[str, object] = {
        "template_id": TEMPLATE,
        "timeout_s": 300,
        "metadata": {},
        "env_vars": {},
        "on_timeout": "kill",
        "auto_resume": False,
        **changes,
    }
    return CreateRequest(**fields)  # type: ignore[arg-type]


class Service:
    def __init__(self, pool: FakePool, target: int) -> None:
        self.pool = pool
        pool.controller.respawn = False  # as in the gateway: the keeper refills
        self.keeper = PoolKeeper(pool.controller, {TEMPLATE: target}, tick_s=0.05)
        self.ended: list[str] = []
        self.changed: list[str] = []
        self.keeper.notices.subscribe(self.changed.append, self.ended.append)
        self.service = SandboxService(
            pool.settings, pool.controller, self.keeper, TemplateCatalog(pool.store)
        )


@pytest.fixture()
def svc(tmp_path: Path) -> Iterator[Service]:
    s = Service(fake_pool(tmp_path), target=2)
    yield s
    s.keeper.stop()


def test_create_takes_a_pool_entry_and_refill_replaces_it(svc: Service) -> None:
    svc.pool.controller.warm(TEMPLATE, 2)
    handed, fresh = svc.service.create(_request(metadata={"k": "v"}), tenant(), None)
    assert fresh and handed.entry.state is State.IN_USE
    assert handed.sandbox.metadata == {"k": "v"}
    svc.keeper.start()
    assert wait_until(lambda: svc.pool.controller.pool_size(TEMPLATE) == 2)


def test_an_empty_pool_starts_cold_or_answers_429(tmp_path: Path) -> None:
    cold = Service(fake_pool(tmp_path / "a"), target=0)
    handed, _ = cold.service.create(_request(), tenant(), None)
    assert cold.pool.fake.calls_for(handed.sandbox.id) == ["spawn", "wait_ready", "resume"]

    strict = Service(fake_pool(tmp_path / "b", COPPICE_COLD_START="false"), target=0)
    with pytest.raises(PoolExhausted) as info:
        strict.service.create(_request(), tenant(), None)
    assert info.value.http_status == 429 and info.value.retry_after_s >= 1


def test_creates_beyond_the_spawn_slots_wait_for_one_instead_of_429(
    tmp_path: Path,
) -> None:
    pool = fake_pool(tmp_path, COPPICE_SPAWN_SLOTS="1")
    started = threading.Event()
    release = threading.Event()

    def slow_ready(entry_id: str) -> None:
        started.set()
        assert release.wait(5)

    pool.fake.on_wait_ready = slow_ready
    svc = Service(pool, target=0)
    with ThreadPoolExecutor(2) as runner:
        first = runner.submit(svc.service.create, _request(), tenant(), None)
        assert started.wait(5)
        second = runner.submit(svc.service.create, _request(), tenant(), None)
        time.sleep(0.3)  # the second waits on the one slot, not a 429
        assert not second.done()
        release.set()
        ids = {first.result(5)[0].sandbox.id, second.result(5)[0].sandbox.id}
    assert len(ids) == 2


def test_idempotent_create_returns_the_same_sandbox(svc: Service) -> None:
    svc.pool.controller.warm(TEMPLATE, 2)
    first, fresh = svc.service.create(_request(), tenant(), "job-1")
    again, fresh_again = svc.service.create(_request(), tenant(), "job-1")
    assert fresh and not fresh_again and again.sandbox.id == first.sandbox.id
    other, _ = svc.service.create(_request(), tenant("someone-else"), "job-1")
    assert other.sandbox.id != first.sandbox.id


def test_listing_order_filters_and_tenants(svc: Service) -> None:
    svc.pool.controller.warm(TEMPLATE, 2)
    made = []
    for i in range(3):
        made.append(svc.service.create(_request(metadata={"n": str(i)}), tenant(), None)[0])
        time.sleep(0.01)
    svc.service.create(_request(), tenant("other"), None)
    page = svc.service.page(tenant(), parse_list_query({"limit": "2"}))
    assert [h.sandbox.id for h in page.items] == [made[2].sandbox.id, made[1].sandbox.id]
    assert page.total_running == 3 and page.next_token is not None
    rest = svc.service.page(tenant(), parse_list_query({"nextToken": page.next_token}))
    assert [h.sandbox.id for h in rest.items] == [made[0].sandbox.id]
    since = parse_list_query({"startedAfter": _iso(made[1].sandbox.started_at)})
    assert len(svc.service.page(tenant(), since).items) == 2
    none = parse_list_query({"template": "no-such-template"})
    assert svc.service.page(tenant(), none).items == []


def _iso(ts: float) -> str:
    from coppice.gateway.wire import iso

    return iso(ts)


def test_kill_ends_the_sandbox_at_once_and_tears_down_behind(svc: Service) -> None:
    svc.pool.controller.warm(TEMPLATE, 1)
    handed, _ = svc.service.create(_request(), tenant(), None)
    svc.service.kill(tenant(), handed.sandbox.id)
    assert svc.ended == [handed.sandbox.id]
    assert svc.pool.store.get_sandbox(handed.sandbox.id) is None
    assert wait_until(lambda: "destroy" in svc.pool.fake.calls_for(handed.sandbox.id))
    with pytest.raises(SandboxNotFound):
        svc.service.kill(tenant(), handed.sandbox.id)


def test_a_tenant_cannot_touch_another_tenants_sandbox(svc: Service) -> None:
    svc.pool.controller.warm(TEMPLATE, 1)
    handed, _ = svc.service.create(_request(), tenant(), None)
    with pytest.raises(SandboxNotFound):
        svc.service.kill(tenant("intruder"), handed.sandbox.id)
    assert svc.pool.store.get_sandbox(handed.sandbox.id) is not None


def test_timeout_zero_is_reaped_now_and_auto_pause_pauses(svc: Service) -> None:
    svc.pool.controller.warm(TEMPLATE, 2)
    doomed, _ = svc.service.create(_request(), tenant(), None)
    pausing, _ = svc.service.create(_request(on_timeout="pause"), tenant(), None)
    svc.service.set_timeout(tenant(), doomed.sandbox.id, 0)
    svc.service.set_timeout(tenant(), pausing.sandbox.id, 0)
    acted = svc.keeper.reap(time.time())
    assert sorted(acted) == sorted([doomed.sandbox.id, pausing.sandbox.id])
    assert svc.ended == [doomed.sandbox.id]
    paused = svc.pool.store.get_sandbox(pausing.sandbox.id)
    assert paused is not None and paused.entry.state is State.PAUSED
    resumed = svc.service.connect(tenant(), pausing.sandbox.id, 60)
    assert resumed.entry.state is State.IN_USE and resumed.sandbox.end_at > time.time() + 30
    # The relay heard of both changes to the paused one, and of the end of the other.
    assert svc.changed == [pausing.sandbox.id, pausing.sandbox.id]


def test_a_sandbox_that_died_is_found_by_reconcile(svc: Service) -> None:
    svc.pool.controller.warm(TEMPLATE, 1)
    handed, _ = svc.service.create(_request(), tenant(), None)
    svc.pool.fake.kill(handed.sandbox.id)
    report = svc.pool.controller.reconcile()
    assert report.finished_teardowns == [handed.sandbox.id]
    assert svc.pool.store.get_sandbox(handed.sandbox.id) is None


def test_the_template_policy_decides_limits_aliases_and_cold_start(tmp_path: Path) -> None:
    small = Limits(memory_mb=128, pids=64, cpus=0.5, disk_mb=256)
    pool = fake_pool(tmp_path, TemplatePolicy(limits=small, aliases=("tiny",), cold_start=False))
    s = Service(pool, target=0)
    assert s.service.catalog.resolve("tiny").name == TEMPLATE
    assert s.service.limits(TEMPLATE) == small
    with pytest.raises(PoolExhausted):  # the template says: no cold starts
        s.service.create(_request(template_id="tiny"), tenant(), None)
    # The policy survives the store: it is read back, not looked up by name.
    stored = pool.store.get_template(TEMPLATE)
    assert stored.policy.limits == small
    assert json.loads(json.dumps(stored.as_json()))["policy"]["aliases"] == ["tiny"]


def test_a_template_that_cannot_warm_is_retried_later_and_later(tmp_path: Path) -> None:
    svc = Service(fake_pool(tmp_path), target=1)
    svc.pool.fake.failing_spawns = 2
    svc.keeper.start()
    try:
        # The first failure waits a second, the next two, and the pool fills once the
        # spawns work again; it does not retry every 0.05 s tick meanwhile.
        assert wait_until(lambda: svc.keeper.backoff_s(TEMPLATE) > 0, timeout=5)
        assert wait_until(lambda: svc.pool.controller.pool_size(TEMPLATE) == 1, timeout=15)
        spawns = [c for c, _ in svc.pool.fake.calls if c == "spawn"]
        assert len(spawns) <= 4
        assert svc.keeper.backoff_s(TEMPLATE) == 0.0
    finally:
        svc.keeper.stop()


def test_a_connect_that_loses_a_race_to_wake_answers_the_running_sandbox(svc: Service) -> None:
    svc.pool.controller.warm(TEMPLATE, 1)
    handed, _ = svc.service.create(_request(), tenant(), None)
    svc.service.pause(tenant(), handed.sandbox.id)
    stale = svc.service.get(tenant(), handed.sandbox.id)  # seen paused by this request
    svc.service.connect(tenant(), handed.sandbox.id, None)  # another request wakes it
    woken = svc.service._wake(stale, None)
    assert woken.sandbox.id == handed.sandbox.id and woken.entry.state is State.IN_USE
