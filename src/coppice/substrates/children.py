"""The head processes this process started, by entry: drivers that start a host process per
sandbox (a jail's launcher, a VM's QEMU) keep them to see an exit at once, without a /proc
race, and to reap what they started. The exit status of a head seen ending on its own is
kept in `EXITS` for the post-mortem that says why its sandbox died."""

from __future__ import annotations

import subprocess
import threading
from collections import OrderedDict

from coppice.store.records import Handle

#: exits remembered at most: entries whose death nobody examines (a warm that failed) are
#: forgotten oldest first rather than kept for the life of the process
MAX_EXITS = 1024


class ExitLog:
    """Exit statuses (Popen's returncode: negative for a signal) of heads that ended on their
    own, by entry. Process-wide, as the children are: whichever driver instance reaped a
    head, the post-mortem of its entry reads the status here."""

    def __init__(self, keep: int = MAX_EXITS) -> None:
        self._keep = keep
        self._by_entry: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, entry_id: str, status: int) -> None:
        with self._lock:
            self._by_entry[entry_id] = status
            while len(self._by_entry) > self._keep:
                self._by_entry.popitem(last=False)

    def take(self, entry_id: str) -> int | None:
        with self._lock:
            return self._by_entry.pop(entry_id, None)


EXITS = ExitLog()


class Children:
    def __init__(self, exits: ExitLog = EXITS) -> None:
        self._by_entry: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._exits = exits

    def add(self, entry_id: str, child: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._by_entry[entry_id] = child

    def get(self, entry_id: str) -> subprocess.Popen[bytes] | None:
        with self._lock:
            return self._by_entry.get(entry_id)

    def pop(self, entry_id: str) -> subprocess.Popen[bytes] | None:
        with self._lock:
            return self._by_entry.pop(entry_id, None)

    def head_alive(self, entry_id: str, handle: Handle | None) -> bool:
        """Is the sandbox's head process running? Our own child answers first (its exit is
        seen without a /proc race, and its status kept); the handle's identity answers for
        any process."""
        child = self.get(entry_id)
        if child is not None:
            status = child.poll()
            if status is not None:
                self._exits.record(entry_id, status)
                return False
        head = handle.head if handle is not None else None
        return head is not None and head.identity.is_running()
