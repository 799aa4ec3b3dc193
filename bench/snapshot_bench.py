"""Snapshot benchmark: snapshots, sandboxes from them, forks and pauses through the real
e2b SDK against `coppice serve`; prints p50/p95/p99.

    sudo .venv/bin/python bench/snapshot_bench.py [--template base] [--runs 20]
    sudo .venv/bin/python bench/snapshot_bench.py --template python-vm --runs 10 --fork-count 1

Each run's source sandbox has 10 MB written to it first. Timed:
  snapshot                    create_snapshot()
  create from snapshot        Sandbox.create(<snapshot>) until its first command answers
  fork of N                   fork(count=N) until it answers (each fork's agent answered
                              inside before the gateway hands it out), and until a command
                              ran in all N
  pause / resume              pause(keep_memory=True), then False where the substrate has it;
                              connect() until a command answers
For a memory pause that goes to disk (a VM) it also prints what the paused sandbox holds on
disk against its written memory (the non-zero pages QEMU saved) and the guest's own count of
used memory. Baseline in the same run: a plain Sandbox.create() until its first command (the
pool's warm path), which every ratio is over.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from coppice.config import Settings
from coppice.store.store import Store
from latency_stats import percentiles
from serve_process import start_gateway, stop_gateway

WRITE = "head -c 10000000 /dev/urandom > /home/user/blob"
GUEST_USED = "awk '/MemTotal/{t=$2} /MemFree/{f=$2} END{print (t-f)*1024}' /proc/meminfo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="base")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--fork-runs", type=int, default=5)
    ap.add_argument("--fork-count", type=int, default=10)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(f"bench/results/snapshots-{args.template}.json")
    proc, url = start_gateway(
        Path("/tmp/coppice-snapshot-bench.log"),
        {"COPPICE_POOL_TARGETS": f"{args.template}={args.pool}"},
    )
    os.environ.update({"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": "bench"})
    from e2b import Sandbox

    store = Store(Settings.load().database_path)
    fork_row = f"fork of {args.fork_count} -> all answering"
    fork_answer_row = f"fork of {args.fork_count} -> fork() answered"
    rows: dict[str, list[float]] = {k: [] for k in (
        "warm create -> first command (baseline)", "snapshot (10 MB written)",
        "create from snapshot -> first command", fork_answer_row, fork_row,
        "pause (memory)", "resume of a memory pause -> first command",
        "pause (files only)", "resume of a files-only pause -> first command",
    )}  # fmt: skip
    on_disk: list[dict[str, Any]] = []
    refused: set[str] = set()

    def timed(row: str, step: Any) -> Any:
        t0 = time.perf_counter()
        result = step()
        rows[row].append((time.perf_counter() - t0) * 1000)
        return result

    def first_command(sbx: Any) -> None:
        sbx.commands.run("test -s /home/user/blob")

    def one_run(i: int) -> None:
        source = timed(
            "warm create -> first command (baseline)",
            lambda: _created(Sandbox.create(args.template)),
        )
        try:
            source.commands.run(WRITE)
            info = timed("snapshot (10 MB written)", source.create_snapshot)
            child = timed(
                "create from snapshot -> first command",
                lambda: _answering(Sandbox.create(info.snapshot_id), first_command),
            )
            child.kill()
            Sandbox.delete_snapshot(info.snapshot_id)
            if i < args.fork_runs:
                t0 = time.perf_counter()
                results = source.fork(count=args.fork_count)
                rows[fork_answer_row].append((time.perf_counter() - t0) * 1000)
                forks = _forks(results, first_command)
                rows[fork_row].append((time.perf_counter() - t0) * 1000)
                for f in forks:
                    f.kill()
            used = int(source.commands.run(GUEST_USED).stdout.strip())
            timed("pause (memory)", lambda: source.pause(keep_memory=True))
            driver = (store.get(source.sandbox_id).handle or _no_handle()).driver
            if "suspended_bytes" in driver:
                on_disk.append(
                    {
                        "state_bytes": int(driver["suspended_bytes"]),
                        "written_bytes": int(driver.get("suspended_data_pages", 0)) * 4096,
                        "guest_used_bytes": used,
                    }
                )
            timed(
                "resume of a memory pause -> first command",
                lambda: first_command(Sandbox.connect(source.sandbox_id)),
            )
            if "files" in refused:
                return
            try:
                timed("pause (files only)", lambda: source.pause(keep_memory=False))
            except Exception as exc:  # the substrate has no files-only pause
                refused.add("files")
                print(f"files-only pause refused: {exc}")
                return
            timed(
                "resume of a files-only pause -> first command",
                lambda: first_command(Sandbox.connect(source.sandbox_id)),
            )
        finally:
            source.kill()

    try:
        for i in range(args.runs):
            one_run(i)
    finally:
        stop_gateway(proc)
    base = percentiles(rows["warm create -> first command (baseline)"])["p50"]
    print(f"\nsnapshots, template {args.template}, {args.runs} runs (fork: {args.fork_runs}), ms")
    print(f"{'measurement':<48}{'p50':>9}{'p95':>9}{'p99':>9}{'x base':>8}")
    report: dict[str, Any] = {}
    for name, samples in rows.items():
        if not samples:
            continue
        p = percentiles(samples)
        report[name] = p
        print(f"{name:<48}{p['p50']:>9.1f}{p['p95']:>9.1f}{p['p99']:>9.1f}{p['p50'] / base:>8.1f}")
    if on_disk:
        mib = 2**20
        print("\na paused sandbox on disk (its memory and devices), MiB")
        print(f"{'state file':>12}{'written memory':>16}{'ratio':>8}{'guest used':>12}")
        for d in on_disk:
            ratio = d["state_bytes"] / d["written_bytes"] if d["written_bytes"] else 0.0
            print(
                f"{d['state_bytes'] / mib:>12.1f}{d['written_bytes'] / mib:>16.1f}"
                f"{ratio:>8.3f}{d['guest_used_bytes'] / mib:>12.1f}"
            )
        report["paused on disk"] = on_disk
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


def _created(sbx: Any) -> Any:
    sbx.commands.run("true")
    return sbx


def _answering(sbx: Any, check: Any) -> Any:
    check(sbx)
    return sbx


def _forks(results: list[Any], check: Any) -> list[Any]:
    from e2b import Sandbox

    forks = [f for f in results if isinstance(f, Sandbox)]
    if len(forks) != len(results):
        raise SystemExit(f"a fork failed: {results}")
    for f in forks:
        check(f)
    return forks


def _no_handle() -> Any:
    raise SystemExit("the paused sandbox has no handle")


if __name__ == "__main__":
    main()
