"""A vm clone's writable disk: a qcow2 overlay on the golden's disk, against a sparse raw copy.

    sudo .venv/bin/python bench/vm_disk_bench.py [--template python-vm] [--runs 200]

On the instance configured for this host (Settings.load()), with the template's golden
snapshot (booted first if there is none), each way of giving a clone its own disk as the
golden left it is measured:
  make a clone's disk             what spawn does before QEMU starts (ms)
  host disk per fresh clone       what that costs on the host's disk (KiB allocated)
  first writes                    `qemu-img bench` writes into a fresh disk, as a guest's first
                                  writes to new blocks are (MB/s): 64 KiB sequential, and
                                  4 KiB writes each in a cluster of its own (qcow2's worst case:
                                  it fills the rest of a 64 KiB cluster first)
The files are made next to the clones' disks (the state directory) and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from coppice.config import Settings
from coppice.pool.controller import PoolController
from coppice.substrates.vm import VmSubstrate
from latency_stats import percentiles

MIB = 2**20
WRITE_REPEATS = 9
#: qcow2 overlays measured: the default (64 KiB clusters), and 128 KiB clusters split into
#: 4 KiB subclusters (extended L2 entries), so a 4 KiB write copies nothing in
QCOW2_SEEDS = {"plain": "cluster_size=65536", "subclusters": "extended_l2=on,cluster_size=131072"}


def sparse_copy(src: Path, dst: Path) -> None:
    """A copy that skips the source's holes (SEEK_DATA/SEEK_HOLE, copy_file_range)."""
    with src.open("rb") as fin, dst.open("wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break  # only a hole is left
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            left = hole - data
            while left > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), left, data, data)
                data += n
                left -= n
            offset = hole


def timed(make: Callable[[Path], object], dst: Path, runs: int) -> tuple[list[float], int]:
    samples = []
    allocated = 0
    for _ in range(runs):
        dst.unlink(missing_ok=True)
        t0 = time.perf_counter()
        make(dst)
        samples.append((time.perf_counter() - t0) * 1000)
        allocated = dst.stat().st_blocks * 512
    dst.unlink(missing_ok=True)
    return samples, allocated


def write_rate(
    make: Callable[[Path], object], dst: Path, fmt: str, size: int, step: int, count: int
) -> float:
    """MB/s written into a fresh disk: the median of WRITE_REPEATS runs (the host's own
    writeback makes single runs vary several-fold)."""
    rates = []
    for _ in range(WRITE_REPEATS):
        dst.unlink(missing_ok=True)
        make(dst)
        argv = ["qemu-img", "bench", "-w", "-f", fmt, "-t", "unsafe", "-c", str(count)]
        argv += ["-s", str(size), "-S", str(step), "-d", "8", str(dst)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        dst.unlink(missing_ok=True)
        seconds = float(re.findall(r"Run completed in ([0-9.]+) seconds", out)[0])
        rates.append(size * count / seconds / 1e6)
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="python-vm")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench/results/vm_disk.json"))
    args = ap.parse_args()

    c = PoolController(Settings.load())
    vm = c.substrate("vm")
    assert isinstance(vm, VmSubstrate)
    t = c.store.get_template(args.template)
    vm.prepare_host()
    golden = vm.golden(t, c.settings.limits)
    raw = Path(golden.writable_disk)
    scratch = vm.disks.root / "bench-disk"
    seeds = {}
    for name, options in QCOW2_SEEDS.items():
        seeds[name] = vm.disks.root / f"bench-seed-{name}"
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "-u", "-b", str(raw)]
        argv += ["-F", "raw", str(seeds[name]), str(raw.stat().st_size)]
        subprocess.run(argv, check=True)
    ways: dict[str, tuple[str, Callable[[Path], object]]] = {
        "qcow2 overlay (copy of a seed)": (
            "qcow2",
            lambda d: shutil.copyfile(seeds["plain"], d),
        ),
        "qcow2, 4 KiB subclusters": ("qcow2", lambda d: shutil.copyfile(seeds["subclusters"], d)),
        "sparse raw copy": ("raw", lambda d: sparse_copy(raw, d)),
    }
    rows: dict[str, dict[str, object]] = {}
    for label, (fmt, make) in ways.items():
        samples, allocated = timed(make, scratch, args.runs)
        rows[label] = {
            "make_ms": percentiles(samples),
            "allocated_kib": allocated / 1024,
            "seq_64k_mb_s": write_rate(make, scratch, fmt, 64 * 1024, 64 * 1024, 2048),
            "sparse_4k_mb_s": write_rate(make, scratch, fmt, 4096, 64 * 1024, 2048),
        }
    for seed in seeds.values():
        seed.unlink()
    print(
        f"\nvm writable disk: template {t.name}, golden disk {raw.stat().st_size / MIB:.0f} MiB "
        f"({raw.stat().st_blocks / 2:.0f} KiB written by the golden boot)\n"
    )
    print(f"{'':<34}{'make p50':>10}{'p95':>8}{'p99':>8}{'KiB':>9}{'64K MB/s':>10}{'4K MB/s':>9}")
    for label, row in rows.items():
        made = row["make_ms"]
        assert isinstance(made, dict)
        print(
            f"{label:<34}{made['p50']:>10.3f}{made['p95']:>8.3f}{made['p99']:>8.3f}"
            f"{row['allocated_kib']:>9.0f}{row['seq_64k_mb_s']:>10.0f}{row['sparse_4k_mb_s']:>9.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"template": t.name, "ways": rows}, indent=2))
    print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()
