"""Warm-cost benchmark: the CPU one pool entry costs to warm, and the memory it holds warm.

    sudo .venv/bin/python bench/warm_cost_bench.py [--template python ...] [--count 10]

For each template (on the instance configured for this host, Settings.load()): drains its
pool, warms `--count` entries at once and reads
  CPU per entry     a jail's cgroup (cpuacct: everything it ran) or a VM's QEMU process,
                    plus this process (the host-side work: disk, mounts, links, keys) and
                    the template zygotes it started (their forking), over count; a
                    zygote's own start is paid before the measured warm
  entries/s         count over the warm's wall time
  PSS per entry     the proportional set size of the processes in each warm entry (shared
                    pages split between their sharers; what a pool of N really holds is N x
                    this), and their private (unshared) bytes beside it
Baseline in the same run: `python3 -c pass` on this host (the floor of starting one Python).
The pool is drained again at the end and warmed back to its old size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from coppice.config import Settings
from coppice.pool.controller import PoolController
from latency_stats import percentiles

#: the python3 templates run (Debian's), not whatever a PATH finds first (a pyenv shim
#: is a shell script costing ten times the start it wraps)
FLOOR_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cgroup_cpu_s(settings: Settings, entry_id: str) -> float:
    for root in (Path("/sys/fs/cgroup/cpuacct"), Path("/sys/fs/cgroup/cpu,cpuacct")):
        path = root / settings.namespace / entry_id / "cpuacct.usage"
        if path.exists():
            return int(path.read_text()) / 1e9
    path = Path("/sys/fs/cgroup") / settings.namespace / entry_id / "cpu.stat"
    if path.exists():
        usage = dict(line.split() for line in path.read_text().splitlines())
        return int(usage["usage_usec"]) / 1e6
    return 0.0


def process_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cgroup_pids(settings: Settings, entry_id: str) -> list[int]:
    for root in (
        Path("/sys/fs/cgroup/pids"),
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup"),
    ):
        path = root / settings.namespace / entry_id / "cgroup.procs"
        if path.exists():
            return [int(p) for p in path.read_text().split()]
    return []


def memory_of(pids: list[int]) -> tuple[int, int]:
    """(PSS, private) bytes of `pids`."""
    pss = private = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                pss += int(rest.split()[0]) * 1024
            elif key in ("Private_Clean", "Private_Dirty"):
                private += int(rest.split()[0]) * 1024
    return pss, private


def zygote_cpu_s() -> float:
    """CPU of the template zygotes this process started (their forks are in the entries'
    cgroups from their first steps on; the forking is the zygote's own time)."""
    me = os.getpid()
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"/usr/lib/coppice/zygote" not in (proc / "cmdline").read_bytes():
                continue
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if _descends_from(int(proc.name), me):
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
    return False


def floor_s(n: int) -> float:
    before = _children_cpu()
    for _ in range(n):
        subprocess.run([FLOOR_PYTHON, "-c", "pass"], check=True)
    return (_children_cpu() - before) / n


def measure(c: PoolController, template: str, count: int) -> dict[str, float]:
    c.drain(template)
    # One entry first, so the template's zygote (if any) is up: its start is paid once per
    # template version, not per entry.
    c.warm(template, 1)
    c.drain(template)
    host_before = _cpu_self() + _children_cpu() + zygote_cpu_s()
    t0 = time.monotonic()
    report = c.warm(template, count)
    wall = time.monotonic() - t0
    host = _cpu_self() + _children_cpu() + zygote_cpu_s() - host_before
    if report.failures:
        raise SystemExit(f"warming {template} failed: {report.failures[0]}")
    inside = []
    mem = []
    for e in report.started:
        if e.substrate == "vm":
            # a VM is one QEMU process: its CPU and its memory
            pid = e.handle.head.pid if e.handle is not None and e.handle.head else 0
            inside.append(process_cpu_s(pid))
            mem.append(memory_of([pid]))
        else:
            inside.append(cgroup_cpu_s(c.settings, e.id))
            mem.append(memory_of(cgroup_pids(c.settings, e.id)))
    pss = percentiles([m[0] / 2**20 for m in mem])
    private = percentiles([m[1] / 2**20 for m in mem])
    return {
        "cpu_ms_per_entry": (host + sum(inside)) / count * 1000,
        "host_cpu_ms_per_entry": host / count * 1000,
        "entry_cpu_ms_p50": percentiles([s * 1000 for s in inside])["p50"],
        "entries_per_s": count / wall,
        "pss_mb_p50": pss["p50"],
        "pss_mb_p95": pss["p95"],
        "private_mb_p50": private["p50"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", action="append", help="repeatable; default: python")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/results/warm_cost.json"))
    args = ap.parse_args()
    templates = args.template or ["python"]
    c = PoolController(Settings.load())
    c.reconcile()
    floor = floor_s(10) * 1000
    print(f"baseline: python3 -c pass on this host: {floor:.0f} ms CPU\n")
    print(
        f"{'template':<22}{'substrate':<10}{'CPU/entry':>10}{'(host)':>8}{'x floor':>8}"
        f"{'entries/s':>10}{'PSS p50':>9}{'p95':>7}{'private':>9}"
    )
    results: dict[str, object] = {"floor_cpu_ms": floor}
    for t in templates:
        old = len(c.list(t))
        try:
            row = measure(c, t, args.count)
        finally:
            c.drain(t)
            if old:
                c.warm(t, old)
        results[t] = row
        sub = c.store.get_template(t).substrate
        print(
            f"{t:<22}{sub:<10}{row['cpu_ms_per_entry']:>8.0f}ms{row['host_cpu_ms_per_entry']:>6.0f}ms"
            f"{row['cpu_ms_per_entry'] / floor:>8.1f}{row['entries_per_s']:>10.1f}"
            f"{row['pss_mb_p50']:>7.1f}MB{row['pss_mb_p95']:>5.0f}MB{row['private_mb_p50']:>7.1f}MB"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
