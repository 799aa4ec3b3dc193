"""Tearing an entry down step by step: every step is attempted even when an earlier one
failed (a half-built entry has only some of its objects), and what failed is reported once,
together, as the error that names the entry."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from coppice.errors import SubstrateError


class Teardown:
    def __init__(self, entry_id: str) -> None:
        self.entry_id = entry_id
        self.problems: list[str] = []

    def attempt(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except (OSError, SubstrateError) as exc:
            self.problems.append(f"{what}: {exc}")

    def finish(self) -> None:
        if self.problems:
            raise SubstrateError(
                f"destroying {self.entry_id} left work undone: {'; '.join(self.problems)}"
            )


def rmtree_if_exists(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
