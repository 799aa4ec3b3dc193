"""Address decisions for pool entries: which IP is free, and the MAC that goes with it."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


def pick_free(
    candidates: Iterable[ipaddress.IPv4Address], held: Iterable[str], count: int
) -> list[ipaddress.IPv4Address]:
    """The lowest `count` free addresses, or fewer when the range runs out."""
    taken = set(held)
    picked: list[ipaddress.IPv4Address] = []
    for addr in candidates:
        if len(picked) == count:
            break
        if str(addr) not in taken:
            picked.append(addr)
    return picked


def mac_for(ip: ipaddress.IPv4Address | str) -> str:
    """A locally administered MAC derived from the IP.

    Addresses are reused as soon as an entry is gone; deriving the MAC from the IP keeps the
    host's neighbour cache right across that reuse, so the first packet to a fresh entry never
    goes to the MAC of the entry that held the address before it.
    """
    octets = ipaddress.IPv4Address(ip).packed
    return "02:c0:" + ":".join(f"{b:02x}" for b in octets)
