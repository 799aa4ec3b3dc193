"""The service's own metrics in Prometheus's text format (`GET /metrics`), for its operator.

Counters and histograms are bumped where each event happens: the pool controller reports
checkouts, cold starts, failed warms and deaths through its `PoolObserver` (this class), the
sandbox service its 429s, the create handler its latency. Gauges (sandboxes by state, pool
sizes and targets) are read from the store at scrape time, so nothing on the checkout path
keeps them. Each gateway app owns a registry of its own, never the library's global one, so
several apps can live in one process (the tests run many).
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from coppice.lifecycle import State
from coppice.store.store import Store

#: a warm checkout is a database transaction and a thaw: about 2 ms
CHECKOUT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: a create is a checkout plus the agent's /init, or a cold start of seconds
CREATE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: states an entry is seen in (GONE entries have no record)
SEEN_STATES = tuple(s for s in State if s is not State.GONE)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.checkouts = Counter(
            "coppice_checkouts", "Warm entries handed out (pool hits)", ["template"], registry=r
        )
        self.cold_starts = Counter(
            "coppice_cold_starts",
            "Sandboxes started on demand because the pool had none available",
            ["template"],
            registry=r,
        )
        self.rejected_creates = Counter(
            "coppice_rejected_creates",
            "Creates answered 429, by reason: cold_start_off (the pool was empty and cold "
            "starts are off), queue_full (admission_queue_max creates were waiting), "
            "at_capacity (the host is at max_sandboxes, its addresses or min_free_memory_mb), "
            "deadline (no entry would come within admission_deadline_s)",
            ["template", "reason"],
            registry=r,
        )
        self.warm_failures = Counter(
            "coppice_warm_failures",
            "Entries that never became ready (a warm or a cold start failed)",
            ["template"],
            registry=r,
        )
        self.oom_kills = Counter(
            "coppice_oom_kills",
            "Processes the kernel's OOM killer ended inside sandboxes (read every few seconds "
            "and at a sandbox's death)",
            ["template"],
            registry=r,
        )
        self.deaths = Counter(
            "coppice_sandbox_deaths",
            "Handed-out sandboxes that died (not killed by their user or timeout), by reason",
            ["template", "reason"],
            registry=r,
        )
        self.create_seconds = Histogram(
            "coppice_create_seconds",
            "Time to answer a successful create, the whole request",
            ["template"],
            buckets=CREATE_BUCKETS,
            registry=r,
        )
        self.checkout_seconds = Histogram(
            "coppice_checkout_seconds",
            "Time from asking the pool for an entry to its being resumed",
            ["template"],
            buckets=CHECKOUT_BUCKETS,
            registry=r,
        )
        #: OOM kills already counted, per running sandbox
        self._oom_counted: dict[str, int] = {}
        self._lock = threading.Lock()

    def watch_store(
        self,
        store: Store,
        targets: Callable[[], dict[str, int]],
        reasons: Callable[[], dict[str, str]] = dict,
        waiting: Callable[[], dict[str, int]] = dict,
    ) -> None:
        """Report the store's sandboxes and pools at every scrape; `targets` says each
        pool's target size (the keeper's), `reasons` why, `waiting` the creates waiting for
        an entry."""
        self.registry.register(PoolCollector(store, targets, reasons, waiting))

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape's body and its content type, in the format the scraper's Accept header
        asks for (Prometheus's text format unless it asks for OpenMetrics)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    # -- the pool's events (PoolObserver) -------------------------------------------------------

    def checked_out(self, template: str, seconds: float) -> None:
        self.checkouts.labels(template).inc()
        self.checkout_seconds.labels(template).observe(seconds)

    def cold_started(self, template: str) -> None:
        self.cold_starts.labels(template).inc()

    def warm_failed(self, template: str) -> None:
        self.warm_failures.labels(template).inc()

    def sandbox_died(self, sandbox_id: str, template: str, reason: str, oom_kills: int) -> None:
        self.oom_kills_seen(sandbox_id, template, oom_kills)
        self.ended(sandbox_id)
        self.deaths.labels(template, reason).inc()

    def oom_kills_seen(self, sandbox_id: str, template: str, total: int) -> None:
        with self._lock:
            before = self._oom_counted.get(sandbox_id, 0)
            if total > before:
                self._oom_counted[sandbox_id] = total
        if total > before:
            self.oom_kills.labels(template).inc(total - before)

    # -- the gateway's own ----------------------------------------------------------------------

    def ended(self, sandbox_id: str) -> None:
        """The sandbox is over: forget what was counted of it."""
        with self._lock:
            self._oom_counted.pop(sandbox_id, None)

    def rejected(self, template: str, reason: str) -> None:
        self.rejected_creates.labels(template, reason).inc()

    def created(self, template: str, seconds: float) -> None:
        self.create_seconds.labels(template).observe(seconds)


class PoolCollector:
    """Gauges read from the store when scraped: every template built or kept at size
    appears, with zeros, so a pool that empties is seen emptying rather than vanishing."""

    def __init__(
        self,
        store: Store,
        targets: Callable[[], dict[str, int]],
        reasons: Callable[[], dict[str, str]] = dict,
        waiting: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self.store = store
        self.targets = targets
        self.reasons = reasons
        self.waiting = waiting

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        entries = self.store.list_entries()
        targets = self.targets()
        templates = sorted(
            {t.name for t in self.store.list_templates()}
            | set(targets)
            | {e.template for e in entries}
        )
        by_state = Tally((e.template, e.state) for e in entries)
        reasons, waiting = self.reasons(), self.waiting()
        states, size, target, why, queued = self._families()
        for template in templates:
            for state in SEEN_STATES:
                states.add_metric([template, state.value], by_state[(template, state)])
            ready = by_state[(template, State.AVAILABLE)] + by_state[(template, State.WARMING)]
            size.add_metric([template], ready)
            target.add_metric([template], targets.get(template, 0))
            if template in reasons:
                why.add_metric([template, reasons[template]], 1)
            queued.add_metric([template], waiting.get(template, 0))
        return [states, size, target, why, queued]

    @staticmethod
    def _families() -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "coppice_sandboxes",
            "Pool entries and sandboxes by template and lifecycle state (available: warm in "
            "the pool; in_use and paused: handed out)",
            labels=["template", "state"],
        )
        yield GaugeMetricFamily(
            "coppice_pool_size",
            "Entries of the pool available or warming",
            labels=["template"],
        )
        yield GaugeMetricFamily(
            "coppice_pool_target",
            "Entries the gateway keeps the pool at (0: not kept); it follows demand",
            labels=["template"],
        )
        yield GaugeMetricFamily(
            "coppice_pool_target_reason",
            "Why the pool's target is what it is (1 for the reason in force): base (its "
            "configured size), rate (the recent create rate), burst (the largest burst "
            "remembered), maximum or memory (a cap held it below what demand asks for)",
            labels=["template", "reason"],
        )
        yield GaugeMetricFamily(
            "coppice_admission_waiting",
            "Creates waiting for an entry (a refill or a spawn slot for a cold start)",
            labels=["template"],
        )
