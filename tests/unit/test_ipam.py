"""Address picking and the MAC derived from an address."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from coppice.store import ipam

NET = ipaddress.IPv4Network("10.78.0.0/24")
RANGE = [NET.network_address + i for i in range(50, 62)]


def test_pick_free_takes_the_lowest_free_addresses_in_order() -> None:
    held = ["10.78.0.50", "10.78.0.52", "10.78.0.53"]
    assert ipam.pick_free(RANGE, held, 3) == [
        ipaddress.IPv4Address("10.78.0.51"),
        ipaddress.IPv4Address("10.78.0.54"),
        ipaddress.IPv4Address("10.78.0.55"),
    ]


def test_pick_free_returns_fewer_when_the_range_runs_out() -> None:
    held = [str(a) for a in RANGE[:-2]]
    assert ipam.pick_free(RANGE, held, 5) == RANGE[-2:]


def test_pick_free_zero() -> None:
    assert ipam.pick_free(RANGE, [], 0) == []


def test_pick_free_accepts_a_generator_and_stops_early() -> None:
    consumed: list[ipaddress.IPv4Address] = []

    def candidates() -> Iterator[ipaddress.IPv4Address]:
        for a in RANGE:
            consumed.append(a)
            yield a

    assert ipam.pick_free(candidates(), [], 2) == RANGE[:2]
    assert len(consumed) <= 3


@given(
    held=st.sets(st.sampled_from(RANGE)).map(lambda s: [str(a) for a in s]),
    count=st.integers(0, 15),
)
def test_pick_free_properties(held: list[str], count: int) -> None:
    picked = ipam.pick_free(RANGE, held, count)
    free = [a for a in RANGE if str(a) not in held]
    assert picked == free[:count]
    assert len(set(picked)) == len(picked)
    assert not {str(a) for a in picked} & set(held)


def test_mac_for_known_values() -> None:
    assert ipam.mac_for("10.78.0.50") == "02:c0:0a:4e:00:32"
    assert ipam.mac_for(ipaddress.IPv4Address("192.168.255.1")) == "02:c0:c0:a8:ff:01"


@given(st.integers(0, 2**32 - 1))
def test_mac_for_is_locally_administered_unicast_and_injective(n: int) -> None:
    ip = ipaddress.IPv4Address(n)
    mac = ipam.mac_for(ip)
    octets = mac.split(":")
    assert len(octets) == 6
    assert all(len(o) == 2 for o in octets)
    first = int(octets[0], 16)
    assert first & 0x02  # locally administered
    assert not first & 0x01  # unicast
    assert mac == ipam.mac_for(str(ip))
    assert ipaddress.IPv4Address(bytes(int(o, 16) for o in octets[2:])) == ip
