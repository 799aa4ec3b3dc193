"""What a dead sandbox left on the host, read before its teardown removes it: the OOM
counters of its cgroup, its head process's exit status (when this process reaped it) and
the last lines of its console. Judging them is `coppice.pool.deaths`' job; this only reads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from coppice.errors import CoppiceError
from coppice.substrates.base import Substrate
from coppice.substrates.cgroups import CgroupDriver, OomCounters
from coppice.substrates.children import EXITS, ExitLog

#: console lines kept with a death
TAIL_LINES = 10
#: how much of the end of a console log is read for them
TAIL_BYTES = 8192


@dataclass(frozen=True)
class Findings:
    oom: OomCounters | None
    #: Popen's returncode of the head (negative: the signal that killed it); None: not seen
    exit_status: int | None
    console_tail: tuple[str, ...]


class PostMortem:
    def __init__(self, exits: ExitLog = EXITS) -> None:
        self.exits = exits

    def oom_counters(self, sub: Substrate, entry_id: str) -> OomCounters | None:
        """The OOM counters of the entry's own cgroup, if its driver gives each sandbox one
        (the jail does, as `cgroups`; a VM's memory is its guest's business) and it is
        still there."""
        driver = _cgroups_of(sub)
        return None if driver is None else driver.oom_counters(entry_id)

    def examine(self, sub: Substrate, entry_id: str) -> Findings:
        tail = console_tail(sub, entry_id)
        status = self.exits.take(entry_id)
        return Findings(
            oom=self.oom_counters(sub, entry_id),
            exit_status=status if status is not None else init_exit_status(tail),
            console_tail=tail,
        )


#: what a jail's init forked from a zygote prints last (coppice_agent/zygote/init.py), for
#: the exit status no process object of ours saw
_INIT_EXIT = re.compile(r"coppice-init: exit status (\d+)$")


def init_exit_status(tail: tuple[str, ...]) -> int | None:
    for line in reversed(tail):
        found = _INIT_EXIT.search(line)
        if found is not None:
            return int(found.group(1))
    return None


def _cgroups_of(sub: Substrate) -> CgroupDriver | None:
    try:
        found = getattr(sub, "cgroups", None)
    except CoppiceError:
        return None  # the host has no usable cgroups, so no sandbox had one
    return found if hasattr(found, "oom_counters") else None


def console_tail(sub: Substrate, entry_id: str, lines: int = TAIL_LINES) -> tuple[str, ...]:
    try:
        with sub.console_log(entry_id).open("rb") as console:
            size = console.seek(0, os.SEEK_END)
            console.seek(max(0, size - TAIL_BYTES))
            text = console.read().decode("utf-8", "replace")
    except OSError:
        return ()
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return tuple(kept[-lines:])
