"""How many warm entries a template's pool should hold: a pure function of the creates seen.

The pool follows demand. Its target is the largest of
  - the configured base (`pool_targets`, a template's own pool_target),
  - the creates expected while refills catch up: the recent create rate times `lead_s`,
  - the largest burst seen lately: the most creates within any `burst_window_s`, remembered
    for `remember_s` after it happened, so a pool that met a burst of 100 holds 100 warm until
    the burst is that old, and then shrinks back to the base,
and it is capped by what the host allows (`maximum` per template, the room left in the
memory set aside for warm entries). Every target carries the reason it is what it is, which
`coppice pool list` and /metrics show.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Why(StrEnum):
    BASE = "base"  # the configured size: nothing asked for more
    RATE = "rate"  # the recent create rate
    BURST = "burst"  # the largest burst remembered
    MAXIMUM = "maximum"  # capped by the per-template maximum
    MEMORY = "memory"  # capped by the memory set aside for warm entries


@dataclass(frozen=True)
class DemandSettings:
    #: seconds of demand at the recent rate to keep warm: how long a refill takes to catch up
    lead_s: float = 5.0
    #: the rate is creates over this many seconds
    rate_window_s: float = 60.0
    burst_window_s: float = 10.0
    #: how long a burst keeps the pool large after it happened
    remember_s: float = 600.0
    #: the most warm entries one template may hold (0: no cap beyond the host's)
    maximum: int = 100


@dataclass(frozen=True)
class Target:
    count: int
    why: Why
    #: what the demand asked for before any cap
    wanted: int

    def describe(self) -> str:
        if self.why in (Why.MAXIMUM, Why.MEMORY):
            return f"{self.why} cap (demand asks for {self.wanted})"
        return str(self.why)


def largest_burst(times: Iterable[float], window_s: float) -> int:
    """The most of the (ascending) `times` that fall within any `window_s`."""
    best = 0
    inside: deque[float] = deque()
    for t in times:
        inside.append(t)
        while inside[0] <= t - window_s:
            inside.popleft()
        best = max(best, len(inside))
    return best


def target(
    base: int,
    creates: Iterable[float],
    now: float,
    settings: DemandSettings,
    memory_room: int | None = None,
) -> Target:
    """The pool's target from `creates` (ascending unix times of the template's creates) at
    `now`; `memory_room`: how many warm entries in all the memory set aside for them holds
    (None: no memory cap). Neither cap ever cuts below `base`, which the operator chose."""
    recent = [t for t in creates if t > now - settings.remember_s and t <= now]
    in_rate = sum(1 for t in recent if t > now - settings.rate_window_s)
    by_rate = math.ceil(in_rate / settings.rate_window_s * settings.lead_s)
    by_burst = largest_burst(recent, settings.burst_window_s)
    wanted, why = base, Why.BASE
    if by_rate > wanted:
        wanted, why = by_rate, Why.RATE
    if by_burst > wanted:
        wanted, why = by_burst, Why.BURST
    count = wanted
    if settings.maximum and count > max(base, settings.maximum):
        count, why = max(base, settings.maximum), Why.MAXIMUM
    if memory_room is not None and count > max(base, memory_room):
        count, why = max(base, memory_room), Why.MEMORY
    return Target(count, why, wanted)


def forget_before(creates: deque[float], now: float, settings: DemandSettings) -> None:
    """Drop what `target` no longer looks at (the oldest first)."""
    horizon = now - max(settings.remember_s, settings.rate_window_s)
    while creates and creates[0] <= horizon:
        creates.popleft()
