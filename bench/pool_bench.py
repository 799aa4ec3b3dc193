"""Warm-pool benchmark: times the library calls a service makes, prints p50/p95/p99.

    sudo .venv/bin/python bench/pool_bench.py [--template python] [--iterations 100]

Measures, on the instance configured for this host (Settings.load()):
  checkout -> first answer     checkout() then GET /health on the in-sandbox agent
  checkout -> SSH banner       checkout() then the sshd banner over a new connection
  return -> available again    return_entry(): destroy + respawn + ready + paused
  warm throughput              warm(N) with the template cached, entries per second
  cold start (baseline)        reserve + spawn + first answer with no pool, and the ratio
The pool of the template is drained first and warmed back to its old size at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from coppice.config import Settings
from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.substrates.base import AGENT_PORT, SSH_PORT
from coppice.substrates.readiness import agent_health, ssh_banner
from latency_stats import percentiles


def timed_checkouts(
    c: PoolController, template: str, n: int, probe: Callable[[str], object]
) -> tuple[list[float], list[float]]:
    """n x (checkout + probe), each entry returned afterwards; also times the returns."""
    first: list[float] = []
    returns: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        e = c.checkout(template)
        probe(e.ip)
        first.append((time.perf_counter() - t0) * 1000)
        t1 = time.perf_counter()
        fresh = c.return_entry(e.id)
        returns.append((time.perf_counter() - t1) * 1000)
        assert fresh is not None and fresh.state is State.AVAILABLE
    return first, returns


def cold_starts(c: PoolController, template: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.warm(template, 1)  # spawn + wait until it answers (+ a freeze, ~0.3 ms)
        e = c.checkout(template)
        agent_health(e.ip, AGENT_PORT)
        samples.append((time.perf_counter() - t0) * 1000)
        c.drain(template)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="python")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--warm-batch", type=int, default=20)
    ap.add_argument("--cold", type=int, default=30, help="cold-start samples")
    ap.add_argument("--out", type=Path, default=Path("bench/results/pool.json"))
    args = ap.parse_args()

    c = PoolController(Settings.load())
    c.reconcile()
    t = args.template
    old_size = len(c.list(t))
    c.drain(t)
    results: dict[str, object] = {
        "host": platform.node(),
        "cpus": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "template": t,
        "iterations": args.iterations,
    }
    try:
        c.warm(t, args.pool_size)
        first, ret1 = timed_checkouts(
            c, t, args.iterations, lambda ip: agent_health(ip, AGENT_PORT)
        )
        banner, ret2 = timed_checkouts(c, t, args.iterations, lambda ip: ssh_banner(ip, SSH_PORT))
        c.drain(t)
        rates = []
        for _ in range(3):
            report = c.warm(t, args.warm_batch)
            assert not report.failures, report.failures
            rates.append(len(report.started) / report.seconds)
            c.drain(t)
        cold = cold_starts(c, t, args.cold)
    finally:
        c.drain(t)
        if old_size:
            c.warm(t, old_size)

    rows = {
        "checkout -> first answer (ms)": percentiles(first),
        "checkout -> SSH banner (ms)": percentiles(banner),
        "return -> available again (ms)": percentiles(ret1 + ret2),
        "cold start -> first answer (ms)": percentiles(cold),
    }
    ratio = (
        rows["cold start -> first answer (ms)"]["p50"]
        / rows["checkout -> first answer (ms)"]["p50"]
    )
    results["measurements"] = rows
    results["warm_entries_per_s"] = {
        "runs": rates,
        "median": statistics.median(rates),
        "batch": args.warm_batch,
    }
    results["cold_over_warm_p50"] = ratio

    print(
        f"\ncoppice pool benchmark: template {t}, {args.iterations} iterations, "
        f"{results['cpus']} CPUs, kernel {results['kernel']}\n"
    )
    print(f"{'measurement':<34}{'p50':>10}{'p95':>10}{'p99':>10}{'n':>6}")
    for label, p in rows.items():
        print(f"{label:<34}{p['p50']:>10.2f}{p['p95']:>10.2f}{p['p99']:>10.2f}{p['n']:>6.0f}")
    print(
        f"{'warm throughput (entries/s)':<34}{statistics.median(rates):>10.1f}"
        f"   (batches of {args.warm_batch}: {', '.join(f'{r:.1f}' for r in rates)})"
    )
    print(f"{'cold / warm checkout (p50)':<34}{ratio:>10.0f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()
