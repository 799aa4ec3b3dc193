"""What room the host has for more entries: the limits in the configuration (how many
sandboxes, how much memory stays free, how much warm pools may hold) against what the
store and the host say now. Read by the admission queue (a create is refused only when the
host is full) and the keeper (a pool grows only into room that is there)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from coppice.errors import CoppiceError
from coppice.lifecycle import State
from coppice.pool.controller import PoolController

#: what a warm entry is taken to hold before one has been measured
DEFAULT_ENTRY_MB = 128.0
#: how long one reading of an entry's memory stands for its template
ENTRY_SIZE_KEEP_S = 30.0
MEMINFO = Path("/proc/meminfo")


def meminfo_mb(text: str, key: str) -> float | None:
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) / 1024
    return None


def _read_meminfo(key: str) -> float | None:
    try:
        return meminfo_mb(MEMINFO.read_text(), key)
    except OSError:
        return None


class HostRoom:
    def __init__(self, controller: PoolController) -> None:
        self.controller = controller
        self.settings = controller.settings
        self._sizes: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def can_start(self, substrate: str | None = None) -> str | None:
        """Why the host may start no more entries (of `substrate`), or None: it may."""
        s = self.settings
        entries = self.controller.store.list_entries()
        if s.max_sandboxes and len(entries) >= s.max_sandboxes:
            return (
                f"the host holds its max_sandboxes ({s.max_sandboxes}) sandboxes and warm "
                "entries; kill some, or raise max_sandboxes"
            )
        if substrate is not None:
            taken = sum(1 for e in entries if e.substrate == substrate)
            try:
                capacity = self.controller.capacity(substrate)
            except CoppiceError:
                capacity = taken + 1
            if taken >= capacity:
                return f"every one of the {capacity} {substrate} addresses is taken"
        available = _read_meminfo("MemAvailable")
        if available is not None and available < s.min_free_memory_mb:
            return (
                f"the host has {available:.0f} MB of memory available, below "
                f"min_free_memory_mb ({s.min_free_memory_mb})"
            )
        return None

    def warm_budget_mb(self) -> float:
        if self.settings.pool_memory_mb:
            return float(self.settings.pool_memory_mb)
        total = _read_meminfo("MemTotal")
        return (total or 4096.0) / 4

    def warm_entries_room(self, template: str) -> int:
        """How many warm entries of `template` the memory set aside for warm pools holds,
        beside what the other templates' pools hold now."""
        held_elsewhere = 0.0
        counts: dict[str, int] = {}
        for e in self.controller.store.list_entries():
            if e.state in (State.AVAILABLE, State.WARMING) and e.template != template:
                counts[e.template] = counts.get(e.template, 0) + 1
        for other, n in counts.items():
            held_elsewhere += n * self.entry_mb(other)
        room = (self.warm_budget_mb() - held_elsewhere) / self.entry_mb(template)
        return max(0, int(room))

    def entry_mb(self, template: str) -> float:
        """What one warm entry of `template` holds, read off one of them now and then."""
        now = time.monotonic()
        with self._lock:
            known = self._sizes.get(template)
        if known is not None and now - known[1] < ENTRY_SIZE_KEEP_S:
            return known[0]
        size = self._measure(template)
        if size is None:
            return known[0] if known is not None else DEFAULT_ENTRY_MB
        with self._lock:
            self._sizes[template] = (size, now)
        return size

    def _measure(self, template: str) -> float | None:
        for e in self.controller.store.list_entries(template):
            if e.state is not State.AVAILABLE:
                continue
            try:
                usage = self.controller.substrate(e.substrate).usage(e.id, e.handle)
            except CoppiceError:
                return None
            if usage is not None and usage.mem_used > 0:
                # Page cache (the template's files read at start) is shared and reclaimable:
                # what the entry holds of its own is the rest.
                return max(1.0, (usage.mem_used - usage.mem_cache) / 2**20)
        return None
