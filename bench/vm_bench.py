"""vm substrate benchmark: clone restores from the golden snapshot; prints p50/p95/p99.

    sudo .venv/bin/python bench/vm_bench.py [--template python-vm] [--pool 20] [--iterations 40]

Measures, on the instance configured for this host (Settings.load()):
  cold boot (baseline)          boot a VM from its kernel to a warm agent (the golden boot)
  clone restore                 qemu start -> golden state loaded -> running (per entry)
  warm throughput               warm(--pool) from an existing golden, entries per second
  memory per paused entry       PSS of each qemu process with --pool entries warm and paused
  checkout -> first answer      resume (QMP cont) + GET /health on the agent in the guest
  checkout -> SSH banner        resume + the guest sshd's banner on a new connection
The template's pool is drained first and left empty at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from coppice.config import Settings
from coppice.pool.controller import PoolController
from coppice.substrates.base import AGENT_PORT, SSH_PORT
from coppice.substrates.readiness import agent_health, ssh_banner
from coppice.substrates.vm import VmSubstrate
from latency_stats import percentiles
from pool_bench import timed_checkouts


def pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="python-vm")
    ap.add_argument("--pool", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("bench/results/vm.json"))
    args = ap.parse_args()

    c = PoolController(Settings.load())
    c.reconcile()
    vm = c.substrate("vm")
    assert isinstance(vm, VmSubstrate)
    t = c.store.get_template(args.template)
    c.drain(t.name)
    vm.prepare_host()
    try:
        vm.forget_template(t.name)
        t0 = time.perf_counter()
        vm.golden(t, c.settings.limits)
        cold_ms = (time.perf_counter() - t0) * 1000

        report = c.warm(t.name, args.pool)
        assert not report.failures, report.failures
        rate = len(report.started) / report.seconds
        entries = c.list(t.name)
        handles = [e.handle for e in entries if e.handle is not None]
        restores = [float(h.driver.get("restore_ms", 0.0)) for h in handles]
        identities = [float(h.driver.get("identity_ms", 0.0)) for h in handles]
        time.sleep(2)  # paused clones settle (no page is touched while stopped)
        pss = [pss_mb(e.pid) for e in entries if e.pid is not None]
        accel = handles[0].detail if handles and handles[0].detail else "?"

        first, _ = timed_checkouts(
            c, t.name, args.iterations, lambda ip: agent_health(ip, AGENT_PORT)
        )
        banner, _ = timed_checkouts(c, t.name, args.iterations, lambda ip: ssh_banner(ip, SSH_PORT))
    finally:
        c.drain(t.name)

    rows = {
        "clone restore (ms)": percentiles(restores),
        "identity applied in the guest (ms)": percentiles(identities),
        "checkout -> first answer (ms)": percentiles(first),
        "checkout -> SSH banner (ms)": percentiles(banner),
        "PSS per paused entry (MB)": percentiles(pss),
    }
    ratio = cold_ms / rows["checkout -> first answer (ms)"]["p50"]
    print(
        f"\ncoppice vm benchmark: template {t.name}, accel {accel}, pool {args.pool}, "
        f"{len(os.sched_getaffinity(0))} CPUs\n"
    )
    print(f"{'measurement':<38}{'p50':>10}{'p95':>10}{'p99':>10}{'n':>6}")
    for label, p in rows.items():
        print(f"{label:<38}{p['p50']:>10.2f}{p['p95']:>10.2f}{p['p99']:>10.2f}{p['n']:>6.0f}")
    print(f"{'warm throughput (entries/s)':<38}{rate:>10.2f}")
    print(f"{'total PSS of the paused pool (MB)':<38}{sum(pss):>10.0f}")
    print(f"{'cold boot to warm agent (ms)':<38}{cold_ms:>10.0f}")
    print(f"{'cold boot / warm checkout (p50)':<38}{ratio:>10.0f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "host": platform.node(),
                "accel": accel,
                "measurements": rows,
                "warm_entries_per_s": rate,
                "cold_boot_ms": cold_ms,
                "cold_over_warm_p50": ratio,
                "pool": args.pool,
            },
            indent=2,
        )
    )
    print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()
