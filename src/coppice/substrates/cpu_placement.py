"""Which host CPUs a sandbox's cpuset holds: as many as its CPU limit rounds up to, the ones
the fewest other sandboxes hold.

Why a cpuset at all: `nproc`, `os.sched_getaffinity` and every runtime that sizes a thread
pool from the affinity mask (OpenBLAS, Go, the JVM, Node's availableParallelism) read the
mask, not /proc, so only a cpuset makes them see the sandbox's limit; the CFS quota alone
would let them start a thread per host CPU and then be throttled. The cost is that the
scheduler cannot move a sandbox onto an idle CPU outside its set; since the quota already
caps it at `cpus` CPUs of time, the set only matters when two busy sandboxes share a CPU
while another idles, which spreading new sandboxes over the least-held CPUs makes rare.

Pure functions over the kernel's list format ("0-3,8,10-11"); the cgroup drivers do the I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """The CPUs a kernel list names, ascending; an empty list (a fresh v1 cpuset) is ()."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        lo = int(first)
        hi = int(last) if last else lo
        if hi < lo:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's list format, runs folded into ranges: (0, 1, 2, 5) is "0-2,5"."""
    ordered = sorted(set(cpus))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)


def cpus_wanted(limit: float, available: int) -> int:
    """The set's size: the limit rounded up (0.5 CPUs of time still run on one CPU), at
    least one, at most every CPU there is."""
    if available < 1:
        raise ValueError("no CPUs to place a sandbox on")
    return max(1, min(available, math.ceil(limit - 1e-9)))


def choose_cpus(
    available: Sequence[int], held: Iterable[Sequence[int]], limit: float
) -> tuple[int, ...]:
    """The CPUs a new sandbox with CPU limit `limit` gets: of `available`, the ones held by
    the fewest of the other sandboxes' sets (`held`), lower numbers first among equals."""
    load = Counter(cpu for cpus in held for cpu in cpus)
    count = cpus_wanted(limit, len(available))
    ranked = sorted(available, key=lambda cpu: (load[cpu], cpu))
    return tuple(sorted(ranked[:count]))
