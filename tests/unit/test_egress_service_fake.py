"""A sandbox's egress rules through the control plane, over the fake substrate: set before it
runs, replaced by an update, gone with the sandbox, restored after a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coppice.egress_policy import EgressPolicy
from coppice.errors import CoppiceError
from coppice.gateway.catalog import TemplateCatalog
from coppice.gateway.keeper import PoolKeeper
from coppice.gateway.sandboxes import SandboxService
from coppice.gateway.wire import CreateRequest
from coppice.lifecycle import State

from .fake_pool import TEMPLATE, FakePool, fake_pool, tenant

CLOSED = EgressPolicy.parse(True, ["203.0.113.7"], ["0.0.0.0/0"])


def _request(egress: EgressPolicy | None) -> CreateRequest:
    return CreateRequest(TEMPLATE, 300, {}, {}, "kill", False, egress=egress)


@pytest.fixture()
def pool(tmp_path: Path) -> Iterator[FakePool]:
    p = fake_pool(tmp_path)
    p.controller.respawn = False
    yield p


def _service(pool: FakePool) -> SandboxService:
    keeper = PoolKeeper(pool.controller, {TEMPLATE: 0}, tick_s=0.05)
    return SandboxService(pool.settings, pool.controller, keeper, TemplateCatalog(pool.store))


def test_rules_are_in_place_from_the_pool_and_cold(pool: FakePool) -> None:
    svc = _service(pool)
    pool.controller.warm(TEMPLATE, 1)
    warm, _ = svc.create(_request(CLOSED), tenant(), None)
    cold, _ = svc.create(_request(CLOSED), tenant(), None)
    assert pool.fake.egress.policies == {warm.entry.ip: CLOSED, cold.entry.ip: CLOSED}
    assert pool.store.get_sandbox(warm.sandbox.id).sandbox.egress == CLOSED  # type: ignore[union-attr]


def test_plain_sandboxes_cost_the_firewall_nothing(pool: FakePool) -> None:
    svc = _service(pool)
    svc.create(_request(None), tenant(), None)
    svc.create(_request(EgressPolicy.parse(True, ["198.51.100.1"])), tenant(), None)
    assert pool.fake.egress.policies == {}


def test_an_update_replaces_and_a_kill_clears(pool: FakePool) -> None:
    svc = _service(pool)
    handed, _ = svc.create(_request(None), tenant(), None)
    svc.update_network(tenant(), handed.sandbox.id, CLOSED)
    assert pool.fake.egress.policies == {handed.entry.ip: CLOSED}
    svc.update_network(tenant(), handed.sandbox.id, None)
    assert pool.fake.egress.policies == {}
    svc.update_network(tenant(), handed.sandbox.id, CLOSED)
    svc.kill(tenant(), handed.sandbox.id)
    svc.keeper.stop()  # the teardown runs behind the kill; wait for it
    assert pool.fake.egress.policies == {}


def test_a_failed_update_leaves_the_old_rules_in_the_store(
    pool: FakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = _service(pool)
    handed, _ = svc.create(_request(CLOSED), tenant(), None)

    def refuse(ip: str, policy: EgressPolicy | None) -> None:
        raise CoppiceError("nft said no")

    monkeypatch.setattr(pool.fake.egress, "set", refuse)
    with pytest.raises(CoppiceError):
        svc.update_network(tenant(), handed.sandbox.id, None)
    assert pool.store.get_sandbox(handed.sandbox.id).sandbox.egress == CLOSED  # type: ignore[union-attr]


def test_a_sandbox_that_cannot_get_its_rules_is_not_handed_out(
    pool: FakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = _service(pool)
    pool.controller.warm(TEMPLATE, 1)

    def refuse(ip: str, policy: EgressPolicy | None) -> None:
        if policy is not None:
            raise CoppiceError("nft said no")

    monkeypatch.setattr(pool.fake.egress, "set", refuse)
    with pytest.raises(CoppiceError):
        svc.create(_request(CLOSED), tenant(), None)
    assert pool.store.list_sandboxes() == []
    assert all(e.state is not State.IN_USE for e in pool.store.list_entries())


def test_a_restart_restores_exactly_the_stored_rules(pool: FakePool) -> None:
    svc = _service(pool)
    a, _ = svc.create(_request(CLOSED), tenant(), None)
    svc.create(_request(None), tenant(), None)
    pool.fake.egress.policies = {"10.254.0.99": CLOSED}  # stale, from before a crash
    pool.controller.restore_egress()
    assert pool.fake.egress.policies == {a.entry.ip: CLOSED}
