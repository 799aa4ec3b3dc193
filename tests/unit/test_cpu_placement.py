"""Which CPUs a sandbox's cpuset gets: the kernel's list format, the set's size from the
CPU limit, and the spreading over the CPUs other sandboxes hold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coppice.substrates.cpu_placement import (
    choose_cpus,
    cpus_wanted,
    format_cpu_list,
    parse_cpu_list,
)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3\n", (0, 1, 2, 3)),
        ("0", (0,)),
        ("0-2,5,7-8", (0, 1, 2, 5, 7, 8)),
        ("\n", ()),  # a v1 cpuset nobody has set yet
        ("", ()),
    ],
)
def test_parse_cpu_list(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus


def test_parse_cpu_list_refuses_a_backwards_range() -> None:
    with pytest.raises(ValueError, match="3-1"):
        parse_cpu_list("3-1")


@pytest.mark.parametrize(
    ("cpus", "text"),
    [((0, 1, 2, 5), "0-2,5"), ((3,), "3"), ((1, 0), "0-1"), ((), ""), ((4, 6, 8), "4,6,8")],
)
def test_format_cpu_list(cpus: tuple[int, ...], text: str) -> None:
    assert format_cpu_list(cpus) == text


@given(st.sets(st.integers(min_value=0, max_value=300)))
def test_format_then_parse_is_the_same_set(cpus: set[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == tuple(sorted(cpus))


@pytest.mark.parametrize(
    ("limit", "available", "wanted"),
    [(1.0, 2, 1), (0.25, 2, 1), (1.5, 4, 2), (2.0, 4, 2), (8.0, 2, 2), (1.0 + 1e-12, 4, 1)],
)
def test_cpus_wanted_rounds_the_limit_up_within_the_host(
    limit: float, available: int, wanted: int
) -> None:
    assert cpus_wanted(limit, available) == wanted


def test_cpus_wanted_needs_a_cpu() -> None:
    with pytest.raises(ValueError, match="no CPUs"):
        cpus_wanted(1.0, 0)


def test_choose_cpus_takes_the_least_held() -> None:
    assert choose_cpus((0, 1), [], 1.0) == (0,)
    assert choose_cpus((0, 1), [(0,)], 1.0) == (1,)
    assert choose_cpus((0, 1), [(0,), (1,)], 1.0) == (0,)  # a tie: the lower number
    assert choose_cpus((0, 1, 2, 3), [(0, 1), (0,)], 2.0) == (2, 3)
    assert choose_cpus((0, 1, 2, 3), [(0, 1), (2,)], 2.0) == (0, 3)


def test_choose_cpus_ignores_cpus_outside_the_available_ones() -> None:
    # A sibling placed before the host lost CPU 7 counts only where it overlaps.
    assert choose_cpus((2, 3), [(2, 7)], 1.0) == (3,)


@given(
    st.integers(min_value=1, max_value=16),
    st.lists(st.floats(min_value=0.1, max_value=16.0), min_size=1, max_size=40),
)
def test_sequential_placements_stay_balanced(host: int, limits: list[float]) -> None:
    """One sandbox after another: no CPU ever holds more than one set more than another."""
    available = tuple(range(host))
    held: list[tuple[int, ...]] = []
    for limit in limits:
        chosen = choose_cpus(available, held, limit)
        assert len(chosen) == cpus_wanted(limit, host)
        assert set(chosen) <= set(available)
        held.append(chosen)
        load = [sum(cpu in h for h in held) for cpu in available]
        assert max(load) - min(load) <= 1
