"""A build's progress, kept as its log: every `stage`, `advance`, `note` and `log` call of
the builder becomes one line in the store, where the status endpoint reads it from (by its
offset, while the build still runs)."""

from __future__ import annotations

import time

from coppice.store.records import BuildLogEntry
from coppice.store.store import Store

_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn",
           "error": "error", "critical": "error"}  # fmt: skip
#: the longest line kept; a step printing megabytes on one line must not make a row of it
MAX_LINE_CHARS = 4000


class BuildLog:
    """Progress (`coppice.progress.Progress`) that writes a build's log lines."""

    def __init__(self, store: Store, build_id: str) -> None:
        self.store = store
        self.build_id = build_id
        #: the step the builder last logged for; stage lines and notes belong to it too
        self.step: str | None = None
        # The builder announces each step twice, as a stage and as a log line with the
        # step's number: the stage waits for that line, so the two become one.
        self._pending_stage: str | None = None

    def stage(self, name: str, total: int | None = None) -> None:
        self._flush()
        self._pending_stage = name

    def advance(self, detail: str = "", step: int = 1) -> None:
        if detail:
            self._write(detail, "debug", self.step)

    def note(self, message: str) -> None:
        self._write(message, "info", self.step)

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        if step is not None:
            self.step = step
        if self._pending_stage is not None and self._pending_stage == message:
            self._pending_stage = None
        self._write(message, _LEVELS.get(level.lower(), "info"), step)

    def close(self) -> None:
        """Write what is still held back (a stage nothing followed)."""
        self._flush()

    def _flush(self) -> None:
        if self._pending_stage is not None:
            name, self._pending_stage = self._pending_stage, None
            self._append(BuildLogEntry(time.time(), "info", name, self.step))

    def _write(self, message: str, level: str, step: str | None) -> None:
        self._flush()
        self._append(BuildLogEntry(time.time(), level, message, step))

    def _append(self, entry: BuildLogEntry) -> None:
        if len(entry.message) > MAX_LINE_CHARS:
            cut = entry.message[:MAX_LINE_CHARS] + " [...]"
            entry = BuildLogEntry(entry.timestamp, entry.level, cut, entry.step)
        self.store.add_build_logs(self.build_id, [entry])
