"""The last lines a process printed, stdout and stderr together, for a failure message: what
the template's start or ready command said just before it went wrong."""

from __future__ import annotations

from collections import deque

#: longer lines are cut here: a tail is for reading, and one line must not crowd out the rest
MAX_LINE_CHARS = 500


class OutputTail:
    def __init__(self, lines: int) -> None:
        self._keep = lines
        self._lines: deque[str] = deque(maxlen=lines)
        # Per stream: a line on stdout must not be glued to the half line stderr printed.
        self._partial: dict[str, bytes] = {}

    def feed(self, stream: str, chunk: bytes) -> None:
        pending = self._partial.get(stream, b"") + chunk
        *complete, rest = pending.split(b"\n")
        for line in complete:
            self._add(line)
        # Bounded even for output that never ends a line.
        self._partial[stream] = rest[-MAX_LINE_CHARS * 4 :]

    def lines(self) -> list[str]:
        """The last lines, the unfinished ones of each stream included."""
        unfinished = [_text(rest) for rest in self._partial.values() if rest]
        return [*self._lines, *unfinished][-self._keep :]

    def text(self) -> str:
        return "\n".join(self.lines())

    def _add(self, line: bytes) -> None:
        self._lines.append(_text(line))


def _text(line: bytes) -> str:
    text = line.decode("utf-8", errors="replace").rstrip("\r")
    if len(text) > MAX_LINE_CHARS:
        return text[:MAX_LINE_CHARS] + "…"
    return text
