"""Per-entry cgroups on either cgroup v1 (one hierarchy per controller) or v2 (unified).

Both drivers expose the same operations: create with limits, the files a launcher writes its
pid into, freeze/thaw (waiting until the kernel reports the new state), the member pids,
its OOM counters, kill-everything, and removal. `detect()` picks the one the host runs.

Where the host has a cpuset controller, `place_cpus` narrows a cgroup to as many CPUs as
its limit rounds up to (see cpu_placement.py for why), which is what `nproc` and
`os.sched_getaffinity` inside then report. A cgroup starts on all of its parent's CPUs, so
a burst of sandboxes starting at once is spread by the scheduler, and is placed once it is
up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coppice.config import Limits
from coppice.errors import PrerequisiteMissing, SubstrateError
from coppice.resource_usage import parse_memory_stat, process_cpu_ticks
from coppice.substrates.cpu_placement import choose_cpus, format_cpu_list, parse_cpu_list

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
#: v1 controllers joined where the host mounts them: the cpuset holds a sandbox to the CPUs
#: of its limit, cpuacct accounts its CPU time per CPU (what lxcfs shows as its /proc/stat)
V1_VIEW_CONTROLLERS = ("cpuset", "cpuacct")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupUsage:
    cpu_seconds: float
    mem_used: int
    mem_cache: int
    mem_limit: int


@dataclass(frozen=True)
class OomCounters:
    """What the memory controller counted for a cgroup: processes the OOM killer ended in
    it, how often its usage reached the limit, and the limit itself (0: none)."""

    oom_kills: int
    limit_hits: int
    limit_bytes: int


def _counters(text: str) -> dict[str, int]:
    """`key value` lines (memory.oom_control, memory.events) as numbers."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            found[key] = int(value)
    return found


#: CPU weight of an entry while it warms, and from its hand-out on (v1 cpu.shares, v2
#: cpu.weight; 1024 and 100 are the kernel's defaults). Warming entries get a sixteenth of a
#: serving one's share when both want the CPU: refills yield to the sandboxes in use, and
#: take whatever is idle.
V1_SHARES_WARMING, V1_SHARES_SERVING = 64, 1024
V2_WEIGHT_WARMING, V2_WEIGHT_SERVING = 6, 100


def _limit(text: str) -> int:
    value = text.strip()
    return int(value) if value.isdigit() else 0


def _processes_cpu_seconds(pids: list[int]) -> float:
    """CPU time of the live processes and of the children they have reaped. (Without the
    cpuacct controller, which v1 hosts mount apart from cpu, this is what is left to read;
    a process that exited unreaped by anyone in the sandbox is not counted.)"""
    ticks = 0
    for pid in pids:
        try:
            ticks += process_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return ticks / os.sysconf("SC_CLK_TCK")


class CgroupDriver(Protocol):
    version: int

    def prepare(self) -> None: ...
    def remove_parent(self) -> None: ...
    def create(self, name: str, limits: Limits) -> None: ...
    def place_cpus(self, name: str, cpus: float) -> None: ...
    def set_serving(self, name: str) -> None: ...
    def join_files(self, name: str) -> list[Path]: ...
    def freeze(self, name: str) -> None: ...
    def thaw(self, name: str) -> None: ...
    def is_frozen(self, name: str) -> bool: ...
    def pids(self, name: str) -> list[int]: ...
    def usage(self, name: str) -> CgroupUsage: ...
    def oom_counters(self, name: str) -> OomCounters | None: ...
    def kill_all(self, name: str, timeout_s: float = 5.0) -> None: ...
    def remove(self, name: str) -> None: ...
    def names(self) -> set[str]: ...
    def exists(self, name: str) -> bool: ...


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise SubstrateError(f"cannot write {value.strip()!r} to {path}: {exc}") from exc


def _wait_for(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    delay = 0.0001
    while not predicate():
        if time.monotonic() > deadline:
            raise SubstrateError(f"timed out after {timeout_s:.1f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def _kill_frozen(driver: CgroupDriver, name: str, timeout_s: float) -> None:
    """Freeze (no more forks), SIGKILL every member, thaw so the kills land, wait until empty."""
    if not driver.exists(name):
        return
    driver.freeze(name)
    for pid in driver.pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    driver.thaw(name)
    _wait_for(lambda: not driver.pids(name), timeout_s, f"cgroup {name} to empty")


def _read_cpus(path: Path) -> tuple[int, ...]:
    try:
        return parse_cpu_list(path.read_text())
    except (OSError, ValueError):
        return ()  # a sibling removed, or created but not yet placed, meanwhile


def _place_cpus(parent: Path, name: str, available_file: str, cpus: float) -> str:
    """The cpuset.cpus for cgroup `name` under `parent`: the CPUs the fewest siblings hold.
    (Siblings not placed yet hold all of them, which ranks no CPU above another.)"""
    available = _read_cpus(parent / available_file)
    if not available:
        raise SubstrateError(f"{parent / available_file} lists no CPUs to place {name} on")
    held = [
        _read_cpus(d / "cpuset.cpus") for d in parent.iterdir() if d.is_dir() and d.name != name
    ]
    return format_cpu_list(choose_cpus(available, held, cpus))


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SubstrateError(f"cannot remove cgroup {path}: {exc}") from exc


class CgroupV1:
    version = 1

    def __init__(self, parent: str, root: Path = CGROUP_ROOT) -> None:
        self.parent = parent
        self.root = root
        # A host that mounts cpu and cpuacct together links both names to one hierarchy.
        seen = {(root / c).resolve() for c in V1_CONTROLLERS}
        view = []
        for c in V1_VIEW_CONTROLLERS:
            if (root / c).is_dir() and (root / c).resolve() not in seen:
                seen.add((root / c).resolve())
                view.append(c)
        self.controllers: tuple[str, ...] = (*V1_CONTROLLERS, *view)
        # Placement reads the siblings' CPUs and then writes its own: spawns on threads of
        # one process must not both see the same CPU as free.
        self._placing = threading.Lock()

    def _dir(self, controller: str, name: str = "") -> Path:
        base = self.root / controller / self.parent
        return base / name if name else base

    @property
    def _cpuset(self) -> bool:
        return "cpuset" in self.controllers

    def prepare(self) -> None:
        for c in self.controllers:
            self._dir(c).mkdir(exist_ok=True)
        if self._cpuset:
            # A new v1 cpuset starts with no CPUs and no memory nodes, and nothing can
            # join it until both are set: the parent gets the whole host's.
            for key in ("cpuset.cpus", "cpuset.mems"):
                mine = self._dir("cpuset") / key
                if not mine.read_text().strip():
                    _write(mine, (self.root / "cpuset" / key).read_text())

    def remove_parent(self) -> None:
        for c in self.controllers:
            _rmdir(self._dir(c))

    def create(self, name: str, limits: Limits) -> None:
        for c in self.controllers:
            self._dir(c, name).mkdir(parents=True, exist_ok=True)
        mem = limits.memory_mb * 1024 * 1024
        _write(self._dir("memory", name) / "memory.limit_in_bytes", f"{mem}\n")
        _write(self._dir("pids", name) / "pids.max", f"{limits.pids}\n")
        quota = int(limits.cpus * CPU_PERIOD_US)
        _write(self._dir("cpu", name) / "cpu.cfs_period_us", f"{CPU_PERIOD_US}\n")
        _write(self._dir("cpu", name) / "cpu.cfs_quota_us", f"{quota}\n")
        _write(self._dir("cpu", name) / "cpu.shares", f"{V1_SHARES_WARMING}\n")
        if self._cpuset:
            # A new v1 cpuset has no CPUs and no memory nodes: the parent's, until placed.
            parent = self._dir("cpuset")
            for key in ("cpuset.mems", "cpuset.cpus"):
                _write(self._dir("cpuset", name) / key, (parent / key).read_text())

    def place_cpus(self, name: str, cpus: float) -> None:
        if not self._cpuset:
            return
        with self._placing:
            chosen = _place_cpus(self._dir("cpuset"), name, "cpuset.cpus", cpus)
            _write(self._dir("cpuset", name) / "cpuset.cpus", f"{chosen}\n")

    def set_serving(self, name: str) -> None:
        _write(self._dir("cpu", name) / "cpu.shares", f"{V1_SHARES_SERVING}\n")

    def join_files(self, name: str) -> list[Path]:
        return [self._dir(c, name) / "cgroup.procs" for c in self.controllers]

    def _state(self, name: str) -> str:
        return (self._dir("freezer", name) / "freezer.state").read_text().strip()

    def freeze(self, name: str) -> None:
        _write(self._dir("freezer", name) / "freezer.state", "FROZEN\n")
        _wait_for(lambda: self._state(name) == "FROZEN", 5.0, f"{name} to freeze")

    def thaw(self, name: str) -> None:
        _write(self._dir("freezer", name) / "freezer.state", "THAWED\n")

    def is_frozen(self, name: str) -> bool:
        return self._state(name) == "FROZEN"

    def pids(self, name: str) -> list[int]:
        return _read_pids(self._dir("pids", name) / "cgroup.procs")

    def usage(self, name: str) -> CgroupUsage:
        memory = self._dir("memory", name)
        stat = parse_memory_stat((memory / "memory.stat").read_text())
        return CgroupUsage(
            cpu_seconds=_processes_cpu_seconds(self.pids(name)),
            mem_used=int((memory / "memory.usage_in_bytes").read_text()),
            mem_cache=stat.get("total_cache", stat.get("cache", 0)),
            mem_limit=int((memory / "memory.limit_in_bytes").read_text()),
        )

    def oom_counters(self, name: str) -> OomCounters | None:
        """None when the cgroup is gone. (`oom_kill` is in memory.oom_control from 4.13 on;
        older kernels read as no kills.) A host limit reads as huge, not as 0."""
        memory = self._dir("memory", name)
        try:
            control = _counters((memory / "memory.oom_control").read_text())
            hits = int((memory / "memory.failcnt").read_text())
            limit = _limit((memory / "memory.limit_in_bytes").read_text())
        except (OSError, ValueError):
            return None
        return OomCounters(control.get("oom_kill", 0), hits, limit)

    def kill_all(self, name: str, timeout_s: float = 5.0) -> None:
        if not self._dir("freezer", name).is_dir():
            # create() was interrupted before the freezer existed, so the launcher (which runs
            # only after create) never started: nothing can be inside.
            return
        _kill_frozen(self, name, timeout_s)

    def remove(self, name: str) -> None:
        for c in self.controllers:
            _rmdir(self._dir(c, name))

    def exists(self, name: str) -> bool:
        return any(self._dir(c, name).is_dir() for c in self.controllers)

    def names(self) -> set[str]:
        found: set[str] = set()
        for c in self.controllers:
            base = self._dir(c)
            if base.is_dir():
                found.update(p.name for p in base.iterdir() if p.is_dir())
        return found


class CgroupV2:
    version = 2

    def __init__(self, parent: str, root: Path = CGROUP_ROOT) -> None:
        self.parent = parent
        self.root = root
        self._placing = threading.Lock()

    def _dir(self, name: str = "") -> Path:
        base = self.root / self.parent
        return base / name if name else base

    def _has_cpuset(self) -> bool:
        return "cpuset" in (self.root / "cgroup.controllers").read_text().split()

    def prepare(self) -> None:
        self._dir().mkdir(exist_ok=True)
        wanted = {"memory", "pids", "cpu"}
        available = set((self.root / "cgroup.controllers").read_text().split())
        if "cpuset" in available:
            wanted.add("cpuset")
        missing = wanted - available
        if missing:
            raise PrerequisiteMissing(
                f"cgroup v2 lacks the {', '.join(sorted(missing))} controller(s); "
                "enable them in the kernel command line or use a cgroup v1 host"
            )
        for d in (self.root, self._dir()):
            enabled = set((d / "cgroup.subtree_control").read_text().split())
            if not wanted <= enabled:
                _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))

    def remove_parent(self) -> None:
        _rmdir(self._dir())

    def create(self, name: str, limits: Limits) -> None:
        d = self._dir(name)
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "memory.max", f"{limits.memory_mb * 1024 * 1024}\n")
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0\n")
        _write(d / "pids.max", f"{limits.pids}\n")
        _write(d / "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}\n")
        _write(d / "cpu.weight", f"{V2_WEIGHT_WARMING}\n")

    def place_cpus(self, name: str, cpus: float) -> None:
        if not self._has_cpuset():
            return
        with self._placing:
            chosen = _place_cpus(self._dir(), name, "cpuset.cpus.effective", cpus)
            _write(self._dir(name) / "cpuset.cpus", f"{chosen}\n")

    def set_serving(self, name: str) -> None:
        _write(self._dir(name) / "cpu.weight", f"{V2_WEIGHT_SERVING}\n")

    def join_files(self, name: str) -> list[Path]:
        return [self._dir(name) / "cgroup.procs"]

    def _frozen(self, name: str) -> bool:
        for line in (self._dir(name) / "cgroup.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "frozen":
                return value.strip() == "1"
        return False

    def freeze(self, name: str) -> None:
        _write(self._dir(name) / "cgroup.freeze", "1\n")
        _wait_for(lambda: self._frozen(name), 5.0, f"{name} to freeze")

    def thaw(self, name: str) -> None:
        _write(self._dir(name) / "cgroup.freeze", "0\n")

    def is_frozen(self, name: str) -> bool:
        return self._frozen(name)

    def pids(self, name: str) -> list[int]:
        return _read_pids(self._dir(name) / "cgroup.procs")

    def usage(self, name: str) -> CgroupUsage:
        d = self._dir(name)
        cpu = parse_memory_stat((d / "cpu.stat").read_text())
        limit = (d / "memory.max").read_text().strip()
        return CgroupUsage(
            cpu_seconds=cpu.get("usage_usec", 0) / 1e6,
            mem_used=int((d / "memory.current").read_text()),
            mem_cache=parse_memory_stat((d / "memory.stat").read_text()).get("file", 0),
            mem_limit=int(limit) if limit.isdigit() else 0,
        )

    def oom_counters(self, name: str) -> OomCounters | None:
        d = self._dir(name)
        try:
            events = _counters((d / "memory.events").read_text())
            limit = _limit((d / "memory.max").read_text())
        except OSError:
            return None
        return OomCounters(events.get("oom_kill", 0), events.get("max", 0), limit)

    def kill_all(self, name: str, timeout_s: float = 5.0) -> None:
        kill_file = self._dir(name) / "cgroup.kill"
        if kill_file.exists():  # 5.14+: one write kills the whole tree, frozen or not
            _write(kill_file, "1\n")
            _wait_for(lambda: not self.pids(name), timeout_s, f"cgroup {name} to empty")
        else:
            _kill_frozen(self, name, timeout_s)

    def remove(self, name: str) -> None:
        _rmdir(self._dir(name))

    def exists(self, name: str) -> bool:
        return self._dir(name).is_dir()

    def names(self) -> set[str]:
        base = self._dir()
        return {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()


def detect(parent: str, root: Path = CGROUP_ROOT) -> CgroupDriver:
    """v2 when /sys/fs/cgroup is the unified hierarchy, else v1 when its controllers are there."""
    if (root / "cgroup.controllers").exists():
        return CgroupV2(parent, root)
    missing = [c for c in V1_CONTROLLERS if not (root / c).is_dir()]
    if missing:
        raise PrerequisiteMissing(
            f"no cgroup v2 at {root} and cgroup v1 lacks {', '.join(missing)}; "
            "mount the cgroup controllers (systemd does this on a normal boot)"
        )
    return CgroupV1(parent, root)
