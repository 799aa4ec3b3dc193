"""What the gateway's Prometheus metrics cost, over the in-memory fake substrate (no root, no
sandboxes: only the store, the controller and the metrics themselves are timed).

    .venv/bin/python bench/metrics_bench.py [--iterations 2000] [--entries 200]

Measures:
  checkout, no observer        PoolController.checkout of a warm entry, as the CLI makes it
  checkout, counted            the same with the gateway's ServiceMetrics as its observer
  observer call alone          ServiceMetrics.checked_out (a counter and a histogram)
  scrape                       GET /metrics' body (gauges read from the store) with --entries
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from coppice.config import Settings
from coppice.gateway.service_metrics import ServiceMetrics
from coppice.pool.controller import PoolController
from coppice.pool.observer import NoObserver
from coppice.store.records import TemplateRecord
from coppice.store.store import Store
from coppice.substrates.fake import FakeSubstrate
from latency_stats import percentiles

TEMPLATE = "bench"


def fake_controller(root: Path) -> PoolController:
    settings = Settings.load(
        {
            "COPPICE_CONFIG": str(root / "absent.toml"),
            "COPPICE_STATE_DIR": str(root / "state"),
            "COPPICE_RUN_DIR": str(root / "run"),
        }
    )
    store = Store(root / "coppice.db")
    store.put_template(
        TemplateRecord(TEMPLATE, "fake", "ab" * 32, str(root / "rootfs"), time.time(), 1.0, 0)
    )
    fake = FakeSubstrate(settings)
    fake.network = fake.network.__class__("fake0", "10.254.0.0/16", 10, 60000)
    return PoolController(settings, store, substrates={"fake": fake})


def checkout_ms(c: PoolController) -> float:
    c.warm(TEMPLATE, 1)
    t0 = time.perf_counter()
    entry = c.checkout(TEMPLATE)
    took = (time.perf_counter() - t0) * 1000
    c.return_entry(entry.id)
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--entries", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        c = fake_controller(Path(tmp))
        c.respawn = False
        metrics = ServiceMetrics()
        plain: list[float] = []
        counted: list[float] = []
        # Interleaved, so that the host's load falls on both alike.
        for _ in range(args.iterations):
            c.observer = NoObserver()
            plain.append(checkout_ms(c))
            c.observer = metrics
            counted.append(checkout_ms(c))

        alone = []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            metrics.checked_out(TEMPLATE, 0.002)
            alone.append((time.perf_counter() - t0) * 1000)

        c.warm(TEMPLATE, args.entries)
        metrics.watch_store(c.store, lambda: {TEMPLATE: args.entries})
        scrapes = []
        for _ in range(max(50, args.iterations // 20)):
            t0 = time.perf_counter()
            body, _ = metrics.exposition()
            scrapes.append((time.perf_counter() - t0) * 1000)
        c.drain(TEMPLATE)
    results = {
        "checkout, no observer (ms)": percentiles(plain),
        "checkout, counted (ms)": percentiles(counted),
        "observer call alone (ms)": percentiles(alone),
        f"scrape, {args.entries} entries (ms, {len(body)} bytes)": percentiles(scrapes),
    }
    for name, stats in results.items():
        print(
            f"{name:45s} p50 {stats['p50']:.4f}  p95 {stats['p95']:.4f}  "
            f"p99 {stats['p99']:.4f}  n={stats['n']}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
