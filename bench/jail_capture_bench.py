"""A jail snapshot's capture in the library: syncfs (what `JailSubstrate.snapshot` does)
against FIFREEZE (what it did, the baseline), alternated in one run; every copy is checked
with `e2fsck -fn`. Prints p50/p95/p99.

    sudo .venv/bin/python bench/jail_capture_bench.py [--template base] [--iterations 20]

Each iteration writes 10 MB into a checked-out entry's writable layer from the host, then
takes the capture: the entry's processes frozen, its filesystem written out (syncfs) or
frozen (FIFREEZE, then thawed), its disk image copied sparse.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import tempfile
import time
from pathlib import Path

from coppice.config import Settings
from coppice.host.fs_sync import syncfs
from coppice.host.sparse_files import copy_sparse
from coppice.pool.controller import PoolController
from coppice.substrates.jail import JailSubstrate
from latency_stats import percentiles

#: _IOWR('X', 119, int) and _IOWR('X', 120, int) from linux/fs.h
FIFREEZE, FITHAW = 0xC0045877, 0xC0045878


def freeze_and_thaw(mount_point: Path) -> None:
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        fcntl.ioctl(fd, FITHAW, 0)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="base")
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args()

    c = PoolController(Settings.load())
    c.reconcile()
    jail = c.substrate("jail")
    assert isinstance(jail, JailSubstrate)
    c.drain(args.template)
    c.warm(args.template, 1)
    entry = c.checkout(args.template)
    entry_dir = jail.entry_dir(entry.id)
    ways = {"FIFREEZE (baseline)": freeze_and_thaw, "syncfs (chosen)": syncfs}
    rows: dict[str, list[float]] = {name: [] for name in ways}
    unclean: dict[str, int] = dict.fromkeys(ways, 0)
    try:
        with tempfile.TemporaryDirectory(dir=c.settings.state_dir) as scratch:
            for i in range(args.iterations):
                for name, write_out in ways.items():
                    blob = entry_dir / "merged" / "home" / "user" / "blob"
                    blob.write_bytes(os.urandom(10_000_000))
                    copy = Path(scratch) / f"{i}.img"
                    started = time.perf_counter()
                    jail.cgroups.freeze(entry.id)
                    try:
                        write_out(entry_dir)
                        copy_sparse(jail.disks.image(entry.id), copy)
                    finally:
                        jail.cgroups.thaw(entry.id)
                    rows[name].append((time.perf_counter() - started) * 1000)
                    checked = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True)
                    unclean[name] += checked.returncode != 0
                    copy.unlink()
    finally:
        c.drain(args.template)

    print(f"\njail capture, 10 MB written, {args.iterations} each (ms)")
    print(f"{'way':<22} {'p50':>7} {'p95':>7} {'p99':>7}  copies e2fsck found unclean")
    for name, samples in rows.items():
        s = percentiles(samples)
        print(f"{name:<22} {s['p50']:7.1f} {s['p95']:7.1f} {s['p99']:7.1f}  {unclean[name]}")


if __name__ == "__main__":
    main()
