"""E2B's metrics from a sandbox's readings: CPU share between readings, memory and disk as
read, the time range the SDK asks for, readings dropped with their sandbox."""

from __future__ import annotations

import time
from pathlib import Path

from coppice.gateway.sandbox_metrics import SandboxMetrics, metric_json
from coppice.resource_usage import (
    Reading,
    ResourceUsage,
    in_range,
    metrics,
    parse_memory_stat,
    process_cpu_ticks,
)

from .fake_pool import TEMPLATE, fake_pool, sandbox_record

MIB = 1 << 20


def usage(cpu_s: float, mem: int = 100 * MIB) -> ResourceUsage:
    return ResourceUsage(cpu_s, mem, 10 * MIB, 512 * MIB, 5 * MIB, 1024 * MIB)


def test_cpu_is_the_share_of_the_sandboxs_cpus_busy_between_readings() -> None:
    readings = [
        Reading(110.0, usage(5.0)),
        Reading(120.0, usage(15.0)),
        Reading(130.0, usage(15.0)),
    ]
    found = metrics(readings, started_at=100.0, cpus=2.0)
    # 5 s of CPU in the first 10 s on two CPUs, then 10 s in 10 s, then idle.
    assert [m.cpu_used_pct for m in found] == [25.0, 50.0, 0.0]
    assert found[0].cpu_count == 2 and found[0].mem_total == 512 * MIB
    assert [m.timestamp for m in in_range(found, 115, 125)] == [120.0]


def test_a_fractional_limit_counts_whole_cpus_and_pct_stays_within_bounds() -> None:
    found = metrics([Reading(101.0, usage(9.0))], started_at=100.0, cpus=1.5)
    assert found[0].cpu_count == 2 and found[0].cpu_used_pct == 100.0


def test_cgroup_and_proc_parsing() -> None:
    assert parse_memory_stat("cache 4096\nrss 8192\ntotal_cache 12288\n")["total_cache"] == 12288
    line = "42 (python3 -m x) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0"
    assert process_cpu_ticks(line) == 250 + 50 + 7 + 3


def test_readings_follow_running_sandboxes(tmp_path: Path) -> None:
    pool = fake_pool(tmp_path)
    pool.controller.warm(TEMPLATE, 1)
    started = time.time() - 60
    entry_id = pool.store.checkout(TEMPLATE, sandbox_record(started_at=started)).entry.id
    handed = pool.store.get_sandbox(entry_id)
    assert handed is not None
    pool.fake.sandboxes[entry_id].usage = usage(0.5)
    sampler = SandboxMetrics(pool.controller, interval_s=5.0)
    sampler.sample_if_due(started + 30)
    sampler.sample_if_due(started + 31)  # not due: no second reading
    found = sampler.of(handed, cpus=1.0, start=None, end=None)
    assert len(found) == 2  # the keeper's reading, and one taken now (it was old)
    assert found[0].cpu_used_pct == round(100 * 0.5 / 30, 2)  # since the sandbox started
    wire = metric_json(found[0])
    assert wire["memUsed"] == 100 * MIB and wire["diskTotal"] == 1024 * MIB
    assert set(wire) == {"timestamp", "timestampUnix", "cpuCount", "cpuUsedPct", "memUsed",
                         "memTotal", "memCache", "diskUsed", "diskTotal"}  # fmt: skip

    pool.fake.sandboxes[entry_id].usage = None  # a driver that cannot tell
    assert len(sampler.of(handed, 1.0, None, None)) == 2  # what was read stays
    pool.controller.return_entry(entry_id)
    sampler.sample_if_due(time.time())
    assert sampler.of(handed, 1.0, None, None) == []  # gone with its sandbox
