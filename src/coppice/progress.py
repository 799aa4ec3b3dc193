"""How long operations report progress. The library calls these; the CLI draws them."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def stage(self, name: str, total: int | None = None) -> None:
        """A new step begins; `total` is how many `advance` calls it will make, if known."""

    def advance(self, detail: str = "", step: int = 1) -> None: ...

    def note(self, message: str) -> None:
        """A line worth keeping in the output (a warning, a result)."""


class SilentProgress:
    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, detail: str = "", step: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass
