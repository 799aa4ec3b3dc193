"""Rollback on return against destroy-and-respawn: what a returned entry costs until the
pool has an entry like it available again; prints p50/p95/p99 of both in one run.

    sudo .venv/bin/python bench/rollback_bench.py [--template base] [--iterations 20]
    sudo .venv/bin/python bench/rollback_bench.py --template python-vm --iterations 10

Each entry is checked out first (a jail's with 10 MB written to its writable layer). Timed:
  respawn (baseline)   what a return does today: `PoolController.return_entry`, i.e. the
                       entry destroyed and a fresh one warmed (answering, paused, available)
  in place, jail       its processes killed and its writable layer dropped, while its
                       directory and cgroup stay; its processes started again on a fresh
                       layer, answering, frozen
  in place, vm         the clone's QEMU kept: the clean state saved once into its own disk
                       (`snapshot-save`) is loaded back (`snapshot-load`), the guest given a
                       new identity, answering, stopped; also its PSS afterwards, against a
                       fresh clone's (a load writes every page of guest RAM, so the pages a
                       clone shared with its golden become its own)
The in-place paths keep the entry's id (a product path would rename it: a killed sandbox's
id must not come back), so they are measured at their most favourable.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coppice.config import Settings
from coppice.host import mounts
from coppice.pool.controller import PoolController
from coppice.store.records import EntryRecord, TemplateRecord
from coppice.substrates.base import Handle
from coppice.substrates.jail import JailSubstrate
from latency_stats import percentiles

WRITTEN = 10_000_000


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def respawn(c: PoolController, template: TemplateRecord) -> float:
    entry = c.checkout(template.name)
    _write_into(c, entry)
    started = time.perf_counter()
    replacement = c.return_entry(entry.id)
    took = _ms(started)
    assert replacement is not None and replacement.state.value == "available", replacement
    return took


def _write_into(c: PoolController, entry: EntryRecord) -> None:
    """10 MB onto a jail's writable layer, from the host (a VM's disk is the guest's)."""
    if entry.substrate == "jail":
        jail = c.substrate("jail")
        assert isinstance(jail, JailSubstrate)
        home = jail.entry_dir(entry.id) / "merged" / "home" / "user"
        (home / "blob").write_bytes(os.urandom(WRITTEN))


# -- jail ----------------------------------------------------------------------------------


def jail_in_place(c: PoolController, template: TemplateRecord) -> float:
    jail = c.substrate("jail")
    assert isinstance(jail, JailSubstrate)
    entry = c.checkout(template.name)
    _write_into(c, entry)
    spec = c._spec(entry, template)
    entry_dir = jail.entry_dir(entry.id)
    started = time.perf_counter()
    jail.cgroups.kill_all(entry.id)
    child = jail._children.pop(entry.id)
    if child is not None:
        child.wait(timeout=5)
    for point in mounts.mounts_under(entry_dir):
        mounts.unmount(point)
    jail.disks.release(entry.id)
    jail.link.remove(entry.id)
    entry_dir.rmdir()  # empty once its disk is off it: spawn makes it again
    handle = _with_cgroup_kept(jail, lambda: jail.spawn(spec))
    jail.wait_ready(spec, handle, c.settings.ready_timeout_s)
    jail.pause(entry.id, handle)
    took = _ms(started)
    c.store.set_handle(entry.id, handle)
    c.return_entry(entry.id)  # leave the pool as it was
    return took


def _with_cgroup_kept(jail: JailSubstrate, spawn: Callable[[], Handle]) -> Handle:
    cgroups = jail.cgroups
    create = cgroups.create
    cgroups.create = lambda name, limits: None  # type: ignore[method-assign]
    try:
        return spawn()
    finally:
        cgroups.create = create  # type: ignore[method-assign]


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="base")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(f"bench/results/rollback-{args.template}.json")

    c = PoolController(Settings.load())
    c.reconcile()
    t = c.store.get_template(args.template)
    c.drain(t.name)
    sub = c.substrate(t.substrate)
    sub.prepare_host()
    rows: dict[str, list[float]] = {"respawn (baseline)": [], "in place": []}
    extra: dict[str, Any] = {}
    try:
        report = c.warm(t.name, 2)
        assert not report.failures, report.failures
        in_place: Callable[[PoolController, TemplateRecord], float]
        if t.substrate == "jail":
            in_place = jail_in_place
        else:
            from vm_rollback import VmInPlace

            vm_in_place = VmInPlace(c, t)
            in_place = vm_in_place.measure
        for i in range(args.iterations):
            # Alternated, so host noise falls on both alike.
            rows["respawn (baseline)"].append(respawn(c, t))
            rows["in place"].append(in_place(c, t))
            print(f"  {i + 1}/{args.iterations}", flush=True)
        if t.substrate == "vm":
            extra = vm_in_place.memory()
    finally:
        c.drain(t.name)

    stats = {k: percentiles(v) for k, v in rows.items()}
    base = stats["respawn (baseline)"]["p50"]
    print(f"\nrollback on return, template {t.name} ({t.substrate}), {args.iterations} each")
    print(f"{'measurement (ms)':<22} {'p50':>8} {'p95':>8} {'p99':>8} {'x respawn':>10}")
    for k, s in stats.items():
        print(f"{k:<22} {s['p50']:8.1f} {s['p95']:8.1f} {s['p99']:8.1f} {s['p50'] / base:10.2f}")
    for k, v in extra.items():
        print(f"{k}: {v}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"stats": stats, "samples": rows, **extra}, indent=2))


if __name__ == "__main__":
    main()
