"""The host's own door, closed to sandboxes: an nftables table per bridge that drops every
connection a sandbox opens towards the host, but to the ports in its `services` set (the
gateway's, the sandboxes' resolver), while the host's connections into sandboxes (and their
answers) pass.

Isolated bridge ports already keep sandboxes from reaching each other over the bridge, and the
egress table (egress_rules.py) judges what is routed beyond the host; this closes the host's
own services (its sshd, a database on 0.0.0.0, anything listening on the bridge address).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from coppice.net import nft


def table_name(bridge: str) -> str:
    return "coppice_guard_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def ruleset(bridge: str) -> str:
    """Idempotent: loading it again rewrites the rules and keeps the `services` set (a running
    gateway's ports stay open across a bridge's repair)."""
    t = table_name(bridge)
    return (
        f"add table inet {t}\n"
        f"add set inet {t} services {{ type inet_service; }}\n"
        f"add chain inet {t} input {{ type filter hook input priority filter; policy accept; }}\n"
        f"flush chain inet {t} input\n"
        f'add rule inet {t} input iifname "{bridge}" ct state established,related accept\n'
        f'add rule inet {t} input iifname "{bridge}" meta l4proto {{ tcp, udp }} '
        f"th dport @services accept\n"
        f'add rule inet {t} input iifname "{bridge}" counter drop\n'
    )


def services_ruleset(bridge: str, ports: Iterable[int], add: bool) -> str:
    t = table_name(bridge)
    listed = ", ".join(str(p) for p in sorted(set(ports)))
    if not listed:
        return ""
    if add:
        return f"add element inet {t} services {{ {listed} }}\n"
    # add first, so that the delete always finds them
    return (
        f"add element inet {t} services {{ {listed} }}\n"
        f"delete element inet {t} services {{ {listed} }}\n"
    )


class HostGuard:
    def __init__(self, bridge: str) -> None:
        self.bridge = bridge

    def ensure(self) -> None:
        nft.load(ruleset(self.bridge), f"install the firewall table for {self.bridge}")

    def open(self, ports: Iterable[int]) -> None:
        """Let sandboxes reach these host ports (TCP and UDP)."""
        nft.load(services_ruleset(self.bridge, ports, add=True), "open the gateway's ports")

    def close(self, ports: Iterable[int]) -> None:
        nft.load(services_ruleset(self.bridge, ports, add=False), "close the gateway's ports")

    def remove(self) -> None:
        t = table_name(self.bridge)
        nft.load(f"add table inet {t}\ndelete table inet {t}\n", f"remove firewall table {t}")

    def installed(self) -> bool:
        return nft.has_table("inet", table_name(self.bridge))
