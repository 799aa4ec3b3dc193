"""Creates that find their pool empty wait here, in order, for an entry instead of failing.

An entry for a waiting create comes from the pool (a refill landing) or from a cold start in
one of the host's spawn slots, whichever comes first; refills take a slot only while no
create is waiting for one, so requests go before refills. A create is refused (429 with
Retry-After) only when waiting cannot help: the queue is at its bound, the host is at its
configured capacity, or the wait would pass the admission deadline at the rate entries have
been arriving. `judge` is that decision, pure; `AdmissionQueue` keeps the order and wakes
waiters as entries and slots come free.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

_T = TypeVar("_T")

#: entries made lately, for the supply rate: how many seconds back it looks
SUPPLY_WINDOW_S = 10.0
MIN_SUPPLY_SEEN = 3


@dataclass(frozen=True)
class Refusal:
    reason: str  # a metrics label: queue_full, at_capacity, deadline
    retry_after_s: float
    message: str


def judge(
    position: int,
    queue_max: int,
    supply_per_s: float,
    remaining_s: float,
    at_capacity: str | None,
) -> Refusal | None:
    """Whether a create `position` places from the head (0: next) should stop waiting.

    `supply_per_s`: entries handed to waiters or landed in the pool per second lately (0:
    none seen yet, and then the wait is not judged by rate); `at_capacity`: why the host
    can start no more entries (None: it can)."""
    if position >= queue_max:
        return Refusal(
            "queue_full",
            5.0,
            f"{position} creates are already waiting (admission_queue_max {queue_max})",
        )
    if at_capacity is not None:
        return Refusal("at_capacity", 5.0, at_capacity)
    if supply_per_s > 0:
        expected = (position + 1) / supply_per_s
        if expected > remaining_s:
            return Refusal(
                "deadline",
                max(1.0, math.ceil(expected)),
                f"{position} creates are ahead of this one and entries arrive at "
                f"{supply_per_s:.1f}/s: about {expected:.0f} s, past the admission deadline",
            )
    return None


class SpawnSlots:
    """How many entries the host starts at once, shared by cold starts and refills. A
    refill takes a slot only while no create is waiting (`held_back`), so requests go
    before refills; every release tells `on_release`, so a waiting create looks at once."""

    def __init__(
        self,
        count: int,
        held_back: Callable[[], bool] = lambda: False,
        on_release: Callable[[], None] = lambda: None,
    ) -> None:
        self.count = count
        self.held_back = held_back
        self.on_release = on_release
        self._free = count
        self._lock = threading.Lock()

    def try_for_refill(self) -> bool:
        if self.held_back():
            return False
        return self.try_for_request()

    def try_for_request(self) -> bool:
        with self._lock:
            if self._free == 0:
                return False
            self._free -= 1
            return True

    def release(self) -> None:
        with self._lock:
            self._free += 1
        self.on_release()


class _Ticket:
    __slots__ = ("template",)

    def __init__(self, template: str) -> None:
        self.template = template


class AdmissionQueue:
    """The creates waiting for an entry, first come first served per template."""

    def __init__(self, queue_max: int) -> None:
        self.queue_max = queue_max
        self._cond = threading.Condition()
        self._queues: dict[str, deque[_Ticket]] = {}
        self._supplied: deque[float] = deque()

    def waiting(self, template: str | None = None) -> int:
        with self._cond:
            if template is not None:
                return len(self._queues.get(template, ()))
            return sum(len(q) for q in self._queues.values())

    def waiting_by_template(self) -> dict[str, int]:
        with self._cond:
            return {t: len(q) for t, q in self._queues.items() if q}

    def supplied(self) -> None:
        """An entry came: one landed in a pool, or a cold start finished. Waiters look."""
        with self._cond:
            now = time.monotonic()
            self._supplied.append(now)
            while self._supplied and self._supplied[0] < now - SUPPLY_WINDOW_S:
                self._supplied.popleft()
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def supply_per_s(self) -> float:
        """Entries per second lately: those within SUPPLY_WINDOW_S over the time since the
        first of them (0 until MIN_SUPPLY_SEEN have come: too few to judge a wait by)."""
        with self._cond:
            now = time.monotonic()
            recent = [t for t in self._supplied if t >= now - SUPPLY_WINDOW_S]
        if len(recent) < MIN_SUPPLY_SEEN:
            return 0.0
        return len(recent) / max(now - recent[0], 0.001)

    def serve(
        self,
        template: str,
        deadline_s: float,
        attempt: Callable[[], _T | None],
        at_capacity: Callable[[], str | None],
        poll_s: float = 0.05,
    ) -> _T | Refusal:
        """Wait in line; at the head, call `attempt` until it answers, or until `judge`
        says waiting cannot help. `attempt` must be quick (take an entry, or claim a spawn
        slot, and answer None when neither can happen yet): it runs by one waiter of the
        template at a time, and the slow part (a cold start in the claimed slot) follows
        once `serve` has returned and the next waiter is at the head."""
        ticket = _Ticket(template)
        deadline = time.monotonic() + deadline_s
        with self._cond:
            queue = self._queues.setdefault(template, deque())
            queue.append(ticket)
        try:
            while True:
                with self._cond:
                    position = queue.index(ticket)
                refused = judge(
                    position,
                    self.queue_max,
                    self.supply_per_s(),
                    deadline - time.monotonic(),
                    at_capacity() if position == 0 else None,
                )
                if refused is not None:
                    return refused
                if time.monotonic() >= deadline:
                    return Refusal(
                        "deadline",
                        max(1.0, math.ceil(position / max(self.supply_per_s(), 0.1))),
                        f"no entry came within the admission deadline ({deadline_s:.0f} s)",
                    )
                if position == 0:
                    got = attempt()
                    if got is not None:
                        return got
                with self._cond:
                    # The head waits only for the next entry or slot; the rest for the head.
                    self._cond.wait(poll_s)
        finally:
            with self._cond:
                queue.remove(ticket)
                if not queue:
                    self._queues.pop(template, None)
                self._cond.notify_all()
