"""Who hears that a sandbox changed or ended. The service and the keeper change sandboxes
and say so here; the relay's caches (where a sandbox is, its kept-alive connections)
subscribe. One owner of invalidation, so no handler, reaper or timeout can forget it."""

from __future__ import annotations

import threading
from collections.abc import Callable

Listener = Callable[[str], None]


class SandboxNotices:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed: list[Listener] = []
        self._ended: list[Listener] = []

    def subscribe(self, changed: Listener, ended: Listener) -> None:
        with self._lock:
            self._changed.append(changed)
            self._ended.append(ended)

    def changed(self, sandbox_id: str) -> None:
        """Paused, resumed: what the relay holds about it is stale."""
        for listener in self._listeners(self._changed):
            listener(sandbox_id)

    def ended(self, sandbox_id: str) -> None:
        """Killed or timed out: its relays must end too."""
        for listener in self._listeners(self._ended):
            listener(sandbox_id)

    def _listeners(self, which: list[Listener]) -> list[Listener]:
        with self._lock:
            return list(which)
