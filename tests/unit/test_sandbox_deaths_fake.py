"""Sandboxes that die, over the fake substrate: the keeper (or reconcile) notices, says why
from what the sandbox left (its cgroup's OOM counters in a fake cgroupfs, its head's exit
status, its console), keeps a tombstone the owner's GET answers with, and counts it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coppice.errors import SandboxNotFound
from coppice.gateway.catalog import TemplateCatalog
from coppice.gateway.keeper import PoolKeeper
from coppice.gateway.sandboxes import SandboxService
from coppice.gateway.service_metrics import ServiceMetrics
from coppice.lifecycle import State
from coppice.store.records import HandedOut
from coppice.substrates.cgroups import V1_CONTROLLERS, CgroupV1
from tests.waiting import wait_until

from .fake_pool import TEMPLATE, FakePool, fake_pool, tenant
from .test_service_fake import _request

MIB = 1024 * 1024
CGROUP_PARENT = "coppice-fake"


class Deaths:
    """The gateway's service, keeper and metrics over the fake, its sandboxes each with a
    cgroup in a fake cgroupfs."""

    def __init__(self, pool: FakePool, cgroupfs: Path) -> None:
        self.pool = pool
        for c in V1_CONTROLLERS:
            (cgroupfs / c).mkdir(parents=True)
        self.cgroups = CgroupV1(CGROUP_PARENT, cgroupfs)
        pool.fake.cgroups = self.cgroups
        pool.controller.respawn = False
        self.metrics = ServiceMetrics()
        pool.controller.observer = self.metrics
        self.keeper = PoolKeeper(pool.controller, {TEMPLATE: 0}, tick_s=0.05, oom_every_s=0)
        self.ended: list[str] = []
        self.keeper.notices.subscribe(lambda _: None, self.ended.append)
        self.service = SandboxService(
            pool.settings, pool.controller, self.keeper, TemplateCatalog(pool.store), self.metrics
        )

    def create(self, who: str = "t") -> HandedOut:
        handed, _ = self.service.create(_request(), tenant(who), None)
        self.cgroups.create(handed.sandbox.id, self.pool.settings.limits)
        return handed

    def oom(self, sandbox_id: str, kills: int, limit_hits: int = 5) -> None:
        memory = self.cgroups.root / "memory" / CGROUP_PARENT / sandbox_id
        (memory / "memory.oom_control").write_text(
            f"oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n"
        )
        (memory / "memory.failcnt").write_text(f"{limit_hits}\n")

    def console(self, sandbox_id: str, text: str) -> None:
        path = self.pool.fake.console_log(sandbox_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def count(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, {"template": TEMPLATE, **labels})
        return found or 0.0

    def died(self, sandbox_id: str, who: str = "t") -> SandboxNotFound:
        with pytest.raises(SandboxNotFound) as info:
            self.service.get(tenant(who), sandbox_id)
        return info.value


@pytest.fixture()
def deaths(tmp_path: Path) -> Iterator[Deaths]:
    d = Deaths(fake_pool(tmp_path), tmp_path / "cgroupfs")
    yield d
    d.keeper.stop()


def test_an_oom_death_is_found_said_and_counted(deaths: Deaths) -> None:
    handed = deaths.create()
    sandbox_id = handed.sandbox.id
    deaths.oom(sandbox_id, kills=1)
    deaths.console(sandbox_id, "agent up\nKilled\n")
    deaths.pool.fake.kill(sandbox_id, exit_status=137)
    assert deaths.keeper.watch() == [sandbox_id]

    gone = deaths.died(sandbox_id)
    assert gone.died is not None and gone.died.reason == "out_of_memory"
    assert gone.died.log_tail == ("agent up", "Killed")
    text = str(gone)
    assert text.startswith(f"sandbox {sandbox_id} was not found: it died at ")
    assert "out of memory: the kernel's OOM killer ended 1 process of it at its 512 MiB" in text
    assert gone.extra_json()["state"] == "killed" and gone.extra_json()["reason"] == "out_of_memory"
    # Another tenant learns nothing of it.
    assert deaths.died(sandbox_id, who="other").died is None

    assert deaths.count("coppice_sandbox_deaths_total", reason="out_of_memory") == 1
    assert deaths.count("coppice_oom_kills_total") == 1
    assert sandbox_id in deaths.ended  # its relays end
    assert wait_until(lambda: "destroy" in deaths.pool.fake.calls_for(sandbox_id))
    assert deaths.keeper.watch() == []  # found once


def test_a_crash_is_told_by_the_heads_exit_status(deaths: Deaths) -> None:
    handed = deaths.create()
    deaths.pool.fake.kill(handed.sandbox.id, exit_status=-11)
    deaths.keeper.watch()
    gone = deaths.died(handed.sandbox.id)
    assert gone.died is not None and gone.died.reason == "crashed"
    assert "its head process was killed by signal 11 (SIGSEGV)" in str(gone)
    assert deaths.count("coppice_sandbox_deaths_total", reason="crashed") == 1


def test_a_kill_or_a_timeout_is_no_death(deaths: Deaths) -> None:
    killed, timed_out = deaths.create(), deaths.create()
    deaths.service.kill(tenant(), killed.sandbox.id)
    deaths.service.set_timeout(tenant(), timed_out.sandbox.id, 0)
    deaths.keeper.reap(time.time() + 1)
    deaths.keeper.watch()
    for handed in (killed, timed_out):
        gone = deaths.died(handed.sandbox.id)
        assert gone.died is None and str(gone) == f"sandbox {handed.sandbox.id} was not found"
    assert deaths.count("coppice_sandbox_deaths_total", reason="unknown") == 0


def test_reconcile_after_a_host_restart_says_so(deaths: Deaths) -> None:
    handed = deaths.create()
    deaths.pool.fake.kill(handed.sandbox.id)  # no status: nothing survives a reboot
    booted = time.time() + 1
    deaths.pool.controller.boot_time = lambda: booted
    report = deaths.pool.controller.reconcile()
    assert report.finished_teardowns == [handed.sandbox.id]
    gone = deaths.died(handed.sandbox.id)
    assert gone.died is not None and gone.died.reason == "host_restarted"
    assert "the host restarted" in str(gone)


def test_resuming_a_paused_sandbox_that_died_records_it(deaths: Deaths) -> None:
    handed = deaths.create()
    deaths.service.pause(tenant(), handed.sandbox.id)
    deaths.pool.fake.kill(handed.sandbox.id, exit_status=1)
    with pytest.raises(SandboxNotFound):
        deaths.service.connect(tenant(), handed.sandbox.id, None)
    gone = deaths.died(handed.sandbox.id)
    assert gone.died is not None and "its init exited with status 1" in gone.died.detail


def test_oom_kills_of_running_sandboxes_are_counted_once(deaths: Deaths) -> None:
    handed = deaths.create()
    sandbox_id = handed.sandbox.id
    deaths.oom(sandbox_id, kills=2)
    deaths.keeper.watch()
    deaths.keeper.watch()
    assert deaths.count("coppice_oom_kills_total") == 2
    assert deaths.service.get(tenant(), sandbox_id).entry.state is State.IN_USE  # survived
    deaths.oom(sandbox_id, kills=3)
    deaths.pool.fake.kill(sandbox_id)
    deaths.keeper.watch()
    assert deaths.count("coppice_oom_kills_total") == 3
    assert deaths.count("coppice_sandbox_deaths_total", reason="out_of_memory") == 1


def test_deaths_are_remembered_for_the_keep_setting_only(tmp_path: Path) -> None:
    d = Deaths(fake_pool(tmp_path, COPPICE_DEAD_SANDBOX_KEEP_S="0.2"), tmp_path / "cgroupfs")
    try:
        handed = d.create()
        d.pool.fake.kill(handed.sandbox.id)
        d.keeper.watch()
        assert d.died(handed.sandbox.id).died is not None
        time.sleep(0.3)
        assert d.died(handed.sandbox.id).died is None
        assert d.keeper.prune_tombstones(time.time()) == 1
    finally:
        d.keeper.stop()


def test_the_keepers_loop_finds_a_death_by_itself(deaths: Deaths) -> None:
    handed = deaths.create()
    deaths.keeper.start()
    deaths.pool.fake.kill(handed.sandbox.id)
    assert wait_until(lambda: deaths.pool.store.get_tombstone(handed.sandbox.id) is not None)
    assert deaths.died(handed.sandbox.id).died is not None


def test_two_finders_of_one_death_record_it_once_with_its_status(deaths: Deaths) -> None:
    handed = deaths.create()
    deaths.pool.fake.kill(handed.sandbox.id, exit_status=-9)
    record = deaths.pool.controller.record_death
    with ThreadPoolExecutor(4) as finders:
        found = list(finders.map(lambda n: record(handed.entry, f"finder {n}"), range(4)))
    assert sum(b is not None for b in found) == 1
    kept = deaths.pool.store.get_tombstone(handed.sandbox.id)
    assert kept is not None and kept.reason == "crashed"  # the status was not lost to a loser
    assert deaths.count("coppice_sandbox_deaths_total", reason="crashed") == 1
