"""Readings of what each running sandbox uses, taken by the keeper every few seconds and kept
for an hour, answered as E2B's `SandboxMetric` entries (`get_metrics`).

A sandbox's readings go with it; a paused sandbox is not read (nothing of it runs). Where a
substrate cannot tell (the vm substrate, for now), the answer is an empty list.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.resource_usage import Metric, Reading, in_range, metrics
from coppice.store.records import HandedOut

#: E2B samples every 5 s
INTERVAL_S = 5.0
KEEP = 720  # an hour of readings at that interval


class SandboxMetrics:
    def __init__(self, controller: PoolController, interval_s: float = INTERVAL_S) -> None:
        self.controller = controller
        self.interval_s = interval_s
        self._readings: dict[str, deque[Reading]] = {}
        self._lock = threading.Lock()
        self._last_pass = 0.0

    def sample_if_due(self, now: float) -> None:
        """The keeper's tick: read every running sandbox once per interval, and forget the
        readings of sandboxes that are gone."""
        if now - self._last_pass < self.interval_s:
            return
        self._last_pass = now
        running = {
            h.sandbox.id: h
            for h in self.controller.store.list_sandboxes()
            if h.entry.state is State.IN_USE
        }
        with self._lock:
            for gone in set(self._readings) - set(running):
                del self._readings[gone]
        for handed in running.values():
            self._read(handed, now)

    def _read(self, handed: HandedOut, now: float) -> Reading | None:
        entry = handed.entry
        usage = self.controller.substrate(entry.substrate).usage(entry.id, entry.handle)
        if usage is None:
            return None
        reading = Reading(now, usage)
        with self._lock:
            self._readings.setdefault(handed.sandbox.id, deque(maxlen=KEEP)).append(reading)
        return reading

    def of(
        self, handed: HandedOut, cpus: float, start: float | None, end: float | None
    ) -> list[Metric]:
        """The sandbox's metrics between `start` and `end` (unix seconds; either open). A
        sandbox read longer ago than an interval (or never: just created) is read now, so
        the answer always reaches the present, as E2B's does."""
        with self._lock:
            readings = list(self._readings.get(handed.sandbox.id, ()))
        now = time.time()
        if handed.entry.state is State.IN_USE and (
            not readings or now - readings[-1].at >= self.interval_s
        ):
            fresh = self._read(handed, now)
            if fresh is not None:
                readings.append(fresh)
        return in_range(metrics(readings, handed.sandbox.started_at, cpus), start, end)


def metric_json(m: Metric) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(m.timestamp, UTC)
    return {
        "timestamp": stamp.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "timestampUnix": int(m.timestamp),
        "cpuCount": m.cpu_count,
        "cpuUsedPct": m.cpu_used_pct,
        "memUsed": m.mem_used,
        "memTotal": m.mem_total,
        "memCache": m.mem_cache,
        "diskUsed": m.disk_used,
        "diskTotal": m.disk_total,
    }
