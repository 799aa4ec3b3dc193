"""Snapshot benchmark: snapshots, sandboxes from them, forks and files-only pauses through
the real e2b SDK against `coppice serve`; prints p50/p95/p99.

    sudo .venv/bin/python bench/snapshot_bench.py [--template base] [--runs 20]

Each run's source sandbox has 10 MB written to it first. Timed:
  snapshot                    create_snapshot()
  create from snapshot        Sandbox.create(<snapshot>) until its first command answers
  fork of 10                  fork(count=10), all ten answering
  files-only pause / resume   pause(keep_memory=False); connect() until a command answers
Baseline in the same run: a plain Sandbox.create() until its first command (the pool's
warm path), which every ratio is over.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from latency_stats import percentiles
from serve_process import start_gateway, stop_gateway

WRITE = "head -c 10000000 /dev/urandom > /home/user/blob"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="base")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--fork-runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/snapshots.json"))
    args = ap.parse_args()
    proc, url = start_gateway(
        Path("/tmp/coppice-snapshot-bench.log"), {"COPPICE_POOL_TARGETS": f"{args.template}=4"}
    )
    os.environ.update({"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": "bench"})
    from e2b import Sandbox

    rows: dict[str, list[float]] = {k: [] for k in (
        "warm create -> first command (baseline)", "snapshot (10 MB written)",
        "create from snapshot -> first command", "fork of 10 -> all answering",
        "files-only pause", "resume of a files-only pause -> first command",
    )}  # fmt: skip
    try:
        for i in range(args.runs):
            t0 = time.perf_counter()
            source = Sandbox.create(args.template)
            source.commands.run("true")
            rows["warm create -> first command (baseline)"].append(
                (time.perf_counter() - t0) * 1000
            )
            try:
                source.commands.run(WRITE)
                t0 = time.perf_counter()
                info = source.create_snapshot()
                rows["snapshot (10 MB written)"].append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                child = Sandbox.create(info.snapshot_id)
                child.commands.run("test -s /home/user/blob")
                rows["create from snapshot -> first command"].append(
                    (time.perf_counter() - t0) * 1000
                )
                child.kill()
                Sandbox.delete_snapshot(info.snapshot_id)
                if i < args.fork_runs:
                    t0 = time.perf_counter()
                    results = source.fork(count=10)
                    forks = [f for f in results if isinstance(f, Sandbox)]
                    if len(forks) != len(results):
                        raise SystemExit(f"a fork failed: {results}")
                    for f in forks:
                        f.commands.run("test -s /home/user/blob")
                    rows["fork of 10 -> all answering"].append((time.perf_counter() - t0) * 1000)
                    for f in forks:
                        f.kill()
                t0 = time.perf_counter()
                source.pause(keep_memory=False)
                rows["files-only pause"].append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                back = Sandbox.connect(source.sandbox_id)
                back.commands.run("test -s /home/user/blob")
                rows["resume of a files-only pause -> first command"].append(
                    (time.perf_counter() - t0) * 1000
                )
            finally:
                source.kill()
    finally:
        stop_gateway(proc)
    base = percentiles(rows["warm create -> first command (baseline)"])["p50"]
    print(f"\nsnapshots, template {args.template}, {args.runs} runs (fork: {args.fork_runs}), ms")
    print(f"{'measurement':<48}{'p50':>9}{'p95':>9}{'p99':>9}{'x base':>8}")
    report = {}
    for name, samples in rows.items():
        if not samples:
            continue
        p = percentiles(samples)
        report[name] = p
        print(f"{name:<48}{p['p50']:>9.1f}{p['p95']:>9.1f}{p['p99']:>9.1f}{p['p50'] / base:>8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
