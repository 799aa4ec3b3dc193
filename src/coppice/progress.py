"""How long operations report progress. The library calls these; the CLI draws them."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def stage(self, name: str, total: int | None = None) -> None:
        """A new step begins; `total` is how many `advance` calls it will make, if known."""

    def advance(self, detail: str = "", step: int = 1) -> None: ...

    def note(self, message: str) -> None:
        """A line worth keeping in the output (a warning, a result)."""

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        """A line of a build's own output (a RUN step's stdout), with the step it came from
        as `step`, E2B's step number counted from 1 ("0" is the base)."""


class SilentProgress:
    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def advance(self, detail: str = "", step: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        pass
