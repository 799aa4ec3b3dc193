"""What both zygotes do on SIGCHLD: reap every child that has exited, and no more (the
forks they make are re-parented or handed to others; a zygote never waits on one)."""

from __future__ import annotations

import os
from types import FrameType


def reap_exited(_signum: int = 0, _frame: FrameType | None = None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
