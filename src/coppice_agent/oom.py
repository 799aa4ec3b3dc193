"""User processes are born the OOM killer's candidates; the agent is not one.

The agent keeps the oom_score_adj the sandbox's init chain has: -1000 (never picked) where
the host could set that, else 0. A process inherits its parent's value at fork, so while a
user process (a command, a PTY, a kernel, the template's start command, a sudo child) is
being forked, the agent carries USER_OOM_SCORE_ADJ itself and goes back to its own value
once the fork is done: the child has the user's value from its first instruction, before
the command runs or forks anything, and it costs two small writes instead of an exec of a
wrapper per process (about 2 ms in a jail). When the sandbox runs out of memory a user
process dies, and the agent reports its exit.

The price is a window of a few milliseconds per start in which the agent is a candidate
too; the kernel then still picks the largest candidate, which is the process filling the
memory, not the agent. Raising is always allowed; going back down is allowed to the
oom_score_adj_min the agent inherited (see the jail's LAUNCHER), which is also as low as a
user process may lower itself: that can stall or upset only its own sandbox.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

#: what user processes get. The kernel ranks a process by its size plus adj/1000 of the
#: memory limit, so at 1000 a user process outranks the agent, sshd and init even where the
#: host could leave those only at 0 (unless the agent alone filled the limit); among user
#: processes the largest dies first.
USER_OOM_SCORE_ADJ = 1000
OWN_SCORE = Path("/proc/self/oom_score_adj")


class UserForks:
    """Brackets the forks of user processes; forks on several threads at once share one
    raise, and the agent goes back down when the last of them is done."""

    def __init__(self, score_file: Path = OWN_SCORE) -> None:
        self._file = score_file
        self._lock = threading.Lock()
        self._forking = 0
        self._own: str | None = None

    @contextlib.contextmanager
    def forking(self) -> Iterator[None]:
        with self._lock:
            if self._forking == 0:
                self._own = self._swap(str(USER_OOM_SCORE_ADJ))
            self._forking += 1
        try:
            yield
        finally:
            with self._lock:
                self._forking -= 1
                if self._forking == 0 and self._own is not None:
                    self._swap(self._own)
                    self._own = None

    def _swap(self, value: str) -> str | None:
        """Write `value`, returning what was there; None (and the score unchanged) when the
        file cannot be used, so children simply get the agent's score."""
        try:
            before = self._file.read_text().strip()
            self._file.write_text(f"{value}\n")
        except OSError as exc:
            log.warning("cannot set the agent's oom_score_adj to %s: %s", value, exc)
            return None
        return before


#: the agent's one bracket, shared by everything that starts user processes
USER_FORKS = UserForks()
