"""Naming a process so that a later process (after a restart) can tell it is the same one.

A pid alone is not an identity: pids are reused. A pid plus its start time (in clock ticks
since boot, field 22 of /proc/PID/stat) is, for as long as the machine stays up; after a
reboot every recorded identity reads as gone, which is what reconcile needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        stat = _read_stat(pid)
        return None if stat is None else cls(pid, stat[1])

    @classmethod
    def current(cls) -> ProcessIdentity:
        me = cls.of(os.getpid())
        assert me is not None
        return me

    def is_running(self) -> bool:
        stat = _read_stat(self.pid)
        return stat is not None and stat[1] == self.start_time and stat[0] not in "ZX"


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time) of a pid, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[19])
