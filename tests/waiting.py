"""Waiting on an event under a deadline, for every test tier: the event itself, never a
guessed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02
) -> bool:
    """Poll until `predicate` is truthy; one last look when the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
