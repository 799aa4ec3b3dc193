"""Entry-disk benchmark: what a jail entry's writable layer costs at spawn and at teardown.

    sudo .venv/bin/python bench/entry_disk_bench.py [--iterations 200] [--disk-mb 1024]

Times, on the instance configured for this host (Settings.load(); its state dir holds the
images), the steps spawn and destroy run for the layer alone, and the ways to make it:
  tmpfs (before)        mount a tmpfs sized to the disk / unmount it
  disk: copy (chosen)   sparse copy of the empty image + loop device + mount / unmount +
                        detach + delete: EntryDisks.create and release
  disk: mkfs            mkfs.ext4 on a fresh sparse file instead of the copy
Nothing else of the instance is touched; every image and device made here is removed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from coppice.config import Settings
from coppice.host import loop_devices, mounts
from coppice.substrates import entry_disk_plan as plan
from coppice.substrates.entry_disk import EntryDisks
from latency_stats import percentiles


def timed(
    n: int, make: Callable[[int], None], remove: Callable[[int], None]
) -> tuple[list[float], list[float]]:
    made: list[float] = []
    removed: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        make(i)
        t1 = time.perf_counter()
        remove(i)
        t2 = time.perf_counter()
        made.append((t1 - t0) * 1000)
        removed.append((t2 - t1) * 1000)
    return made, removed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--disk-mb", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("bench/results/entry_disk.json"))
    args = ap.parse_args()
    settings = Settings.load()
    disks = EntryDisks(settings.state_dir / "entry-disk-bench")
    size = args.disk_mb
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="entry-disk-bench-") as scratch:
        point = Path(scratch)

        def tmpfs_up(_: int) -> None:
            mounts.mount("tmpfs", point, "tmpfs", plan.MOUNT_FLAGS, f"size={size}m,mode=0755")

        def unmount(_: int) -> None:
            mounts.unmount(point)

        def disk_up(i: int) -> None:
            disks.create(f"bench{i:05d}", size, point)

        def disk_down(i: int) -> None:
            mounts.unmount(point)
            disks.release(f"bench{i:05d}")

        def mkfs_up(i: int) -> None:
            image = disks.image(f"mkfs{i:05d}")
            with open(image, "wb") as f:
                f.truncate(size * plan.MIB)
            subprocess.run(plan.mkfs_argv(image), check=True, capture_output=True)
            with loop_devices.attached(image) as device:
                mounts.mount(str(device), point, "ext4", plan.MOUNT_FLAGS, plan.MOUNT_DATA)

        def mkfs_down(i: int) -> None:
            mounts.unmount(point)
            disks.release(f"mkfs{i:05d}")

        try:
            disk_up(0)  # the empty image is made once per size, before any timing
            disk_down(0)
            for label, up, down in (
                ("tmpfs (before)", tmpfs_up, unmount),
                ("disk: copy (chosen)", disk_up, disk_down),
                ("disk: mkfs", mkfs_up, mkfs_down),
            ):
                made, removed = timed(args.iterations, up, down)
                rows[f"{label}: spawn (ms)"] = percentiles(made)
                rows[f"{label}: destroy (ms)"] = percentiles(removed)
        finally:
            for mounted in mounts.mounts_under(point):
                mounts.unmount(mounted)
            for i in range(args.iterations):
                disks.release(f"bench{i:05d}")
                disks.release(f"mkfs{i:05d}")
            disks.remove_empty_images()

    print(f"\nentry disk benchmark: {size} MiB, {args.iterations} iterations\n")
    print(f"{'measurement':<38}{'p50':>9}{'p95':>9}{'p99':>9}{'n':>6}")
    for label, row in rows.items():
        print(f"{label:<38}{row['p50']:>9.2f}{row['p95']:>9.2f}{row['p99']:>9.2f}{row['n']:>6.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"disk_mb": size, "measurements": rows}, indent=2))
    print(f"\nresults written to {args.out}")


if __name__ == "__main__":
    main()
