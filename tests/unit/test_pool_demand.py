"""The pool's target as a pure function of the creates seen: exact cases and a model."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from coppice.pool import demand
from coppice.pool.demand import DemandSettings, Why, largest_burst

SETTINGS = DemandSettings(
    lead_s=5.0, rate_window_s=60.0, burst_window_s=10.0, remember_s=600.0, maximum=100
)
NOW = 10_000.0


def test_no_demand_keeps_the_configured_base() -> None:
    assert demand.target(2, [], NOW, SETTINGS) == demand.Target(2, Why.BASE, 2)


def test_a_steady_rate_keeps_lead_seconds_of_it_warm() -> None:
    # one create every 200 ms for the last minute: 5/s, and 5 s of lead is 25
    creates = [NOW - 60 + 0.2 * i for i in range(1, 301)]
    t = demand.target(2, creates, NOW, DemandSettings(burst_window_s=0.1))
    assert t.why is Why.RATE and t.count == 25


def test_a_burst_is_held_warm_until_it_is_remember_s_old_then_the_pool_shrinks() -> None:
    burst = [NOW - 100 + i * 0.01 for i in range(100)]
    assert demand.target(2, burst, NOW, SETTINGS) == demand.Target(100, Why.BURST, 100)
    later = NOW - 100 + SETTINGS.remember_s + 1
    assert demand.target(2, burst, later, SETTINGS) == demand.Target(2, Why.BASE, 2)


def test_caps_hold_the_target_but_never_below_the_base() -> None:
    burst = [NOW - i * 0.01 for i in range(150)][::-1]
    capped = demand.target(2, burst, NOW, SETTINGS)
    assert capped == demand.Target(100, Why.MAXIMUM, 150)
    assert capped.describe() == "maximum cap (demand asks for 150)"
    by_memory = demand.target(2, burst, NOW, SETTINGS, memory_room=40)
    assert by_memory == demand.Target(40, Why.MEMORY, 150)
    assert demand.target(8, burst, NOW, SETTINGS, memory_room=3).count == 8


def test_creates_in_the_future_or_forgotten_do_not_count() -> None:
    creates = deque([NOW - 700.0, NOW - 5.0, NOW + 50.0])
    assert demand.target(0, creates, NOW, SETTINGS).count == 1
    demand.forget_before(creates, NOW, SETTINGS)
    assert list(creates) == [NOW - 5.0, NOW + 50.0]


def test_largest_burst_counts_the_busiest_window() -> None:
    assert largest_burst([], 10) == 0
    assert largest_burst([0, 1, 2, 20, 21, 22, 23], 10) == 4
    assert largest_burst([0, 10, 20], 10) == 1  # a window is half-open


@given(
    st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=60),
    st.integers(min_value=0, max_value=10),
    st.one_of(st.none(), st.integers(min_value=0, max_value=50)),
)
def test_the_target_is_bounded_and_explained(
    times: list[float], base: int, room: int | None
) -> None:
    ordered = sorted(times)
    t = demand.target(base, ordered, 1000.0, SETTINGS, room)
    assert t.count >= base
    assert t.count <= max(base, SETTINGS.maximum)
    if room is not None:
        assert t.count <= max(base, room)
    assert t.wanted >= t.count or t.why is Why.BASE
    if t.why in (Why.BASE, Why.RATE, Why.BURST):
        assert t.count == t.wanted
    remembered = [x for x in ordered if x > 1000.0 - SETTINGS.remember_s]
    burst = largest_burst(remembered, SETTINGS.burst_window_s)
    assert t.count >= min(burst, SETTINGS.maximum) or room is not None
