"""What a sandbox uses, and how a series of readings becomes E2B's metrics (pure: no I/O).

A substrate reads a `ResourceUsage` (cumulative CPU seconds, memory and disk now); the
gateway keeps the readings of each running sandbox and answers E2B's `SandboxMetric`
entries, where CPU use is the share of the sandbox's CPUs busy between two readings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ResourceUsage:
    #: CPU time used since the sandbox started (all its processes), seconds
    cpu_seconds: float
    mem_used: int
    #: of mem_used, the page cache (files read and written)
    mem_cache: int
    mem_total: int
    disk_used: int
    disk_total: int


@dataclass(frozen=True)
class Reading:
    at: float
    usage: ResourceUsage


@dataclass(frozen=True)
class Metric:
    timestamp: float
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int


def cpu_count(cpus: float) -> int:
    """A sandbox limited to 1.5 CPUs runs on two of them."""
    return max(1, math.ceil(cpus))


def metrics(readings: Sequence[Reading], started_at: float, cpus: float) -> list[Metric]:
    """One metric per reading. CPU use is measured from the reading before; the first is
    measured from the sandbox's start (when it had used no CPU time)."""
    out = []
    previous = Reading(started_at, ResourceUsage(0.0, 0, 0, 0, 0, 0))
    count = cpu_count(cpus)
    for reading in readings:
        wall = reading.at - previous.at
        busy = reading.usage.cpu_seconds - previous.usage.cpu_seconds
        pct = 0.0 if wall <= 0 else max(0.0, min(100.0, 100.0 * busy / (wall * cpus)))
        u = reading.usage
        out.append(
            Metric(
                reading.at,
                count,
                round(pct, 2),
                u.mem_used,
                u.mem_total,
                u.mem_cache,
                u.disk_used,
                u.disk_total,
            )
        )
        previous = reading
    return out


def in_range(found: Sequence[Metric], start: float | None, end: float | None) -> list[Metric]:
    return [
        m
        for m in found
        if (start is None or m.timestamp >= start) and (end is None or m.timestamp <= end)
    ]


def parse_memory_stat(text: str) -> dict[str, int]:
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            found[key] = int(value)
    return found


def process_cpu_ticks(stat_line: str) -> int:
    """utime + stime + cutime + cstime of one /proc/<pid>/stat line, in clock ticks: the
    process's own time and that of the children it has waited for."""
    fields = stat_line.rpartition(")")[2].split()
    # After the command: state(0) ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime(11) stime(12) cutime(13) cstime(14)
    return sum(int(fields[i]) for i in (11, 12, 13, 14))
