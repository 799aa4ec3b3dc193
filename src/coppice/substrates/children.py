"""The head processes this process started, by entry: drivers that start a host process per
sandbox (a jail's launcher, a VM's QEMU) keep them to see an exit at once, without a /proc
race, and to reap what they started."""

from __future__ import annotations

import subprocess
import threading

from coppice.store.records import Handle


class Children:
    def __init__(self) -> None:
        self._by_entry: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

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
        seen without a /proc race); the handle's identity answers for any process."""
        child = self.get(entry_id)
        if child is not None and child.poll() is not None:
            return False
        head = handle.head if handle is not None else None
        return head is not None and head.identity.is_running()
