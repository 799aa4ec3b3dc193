"""The nftables text of a bridge's egress table: what leaves a sandbox for the world, and
through which door. Pure functions of settings and policies; egress_table.py loads them.

One `ip` table per bridge, `coppice_egress_<bridge>`:

  forward      hook forward. Into a sandbox only what answers its own connections; out of
               it, everything goes through `outbound`. Every packet a sandbox sends is judged
               (not only a connection's first), so a rule taken away by an update cuts the
               connections it allowed at once.
  outbound     the rules no policy can lift: only by `egress_interface` when one is set;
               never to sandboxes, link-local/metadata, loopback, multicast or the build
               links; never to the host's private networks unless the operator opened them.
  by_sandbox   `ip saddr vmap @policies`: a sandbox with rules of its own jumps to its chain
               (`sb_<address>`: allowed set, pinned set of resolved allowed domains, denied
               set, then accept); one without falls to the host's default verdict.
  postrouting  masquerade what leaves the bridge for the world.

Every statement is idempotent (`add` creates what is missing, `flush` empties what is there),
so the base can be loaded again while sandboxes run without losing their chains.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from coppice.egress_policy import EgressPolicy

#: never reachable from a sandbox, whatever its rules or the operator's opened networks
NEVER = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local: the cloud metadata service lives here
    "224.0.0.0/3",  # multicast, reserved, broadcast
)
#: the host's private networks: closed unless the operator opens some of them
PRIVATE = (
    "10.0.0.0/8",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
)
#: how long a pinned address of an allowed domain stays allowed after its last answer; longer
#: than any TTL so that connections outlive the record that found them
PIN_SECONDS = 3600


@dataclass(frozen=True)
class EgressHost:
    """What the table of one bridge is made from."""

    bridge: str
    subnet: str
    #: sandbox ranges of this host besides `subnet` (the other substrate's, the build links')
    sandbox_ranges: tuple[str, ...] = ()
    egress_interface: str = ""
    opened: tuple[str, ...] = ()
    internet_by_default: bool = True

    @property
    def table(self) -> str:
        return "coppice_egress_" + re.sub(r"[^A-Za-z0-9_]", "_", self.bridge)


def _elements(networks: Iterable[str | ipaddress.IPv4Network]) -> str:
    return ", ".join(str(n) for n in networks)


def _collapsed(networks: Iterable[str | ipaddress.IPv4Network]) -> list[ipaddress.IPv4Network]:
    """Interval sets refuse overlapping elements; merge them first."""
    return list(ipaddress.collapse_addresses(ipaddress.IPv4Network(n) for n in networks))


def _fill(table: str, name: str, networks: Iterable[str | ipaddress.IPv4Network]) -> list[str]:
    merged = _collapsed(networks)
    lines = [f"flush set ip {table} {name}"]
    if merged:
        lines.append(f"add element ip {table} {name} {{ {_elements(merged)} }}")
    return lines


def base_ruleset(host: EgressHost) -> str:
    t, br = host.table, host.bridge
    default = "accept" if host.internet_by_default else "counter drop"
    never = [*NEVER, host.subnet, *host.sandbox_ranges]
    out = f'oifname "{host.egress_interface}"' if host.egress_interface else f'oifname != "{br}"'
    lines = [
        # Everything is declared before any rule refers to it.
        f"add table ip {t}",
        f"add set ip {t} never {{ type ipv4_addr; flags interval; }}",
        f"add set ip {t} opened {{ type ipv4_addr; flags interval; }}",
        f"add set ip {t} private {{ type ipv4_addr; flags interval; }}",
        f"add map ip {t} policies {{ type ipv4_addr : verdict; }}",
        f"add chain ip {t} forward {{ type filter hook forward priority filter; policy accept; }}",
        f"add chain ip {t} outbound",
        f"add chain ip {t} by_sandbox",
        f"add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}",  # noqa: E501
        *_fill(t, "never", never),
        *_fill(t, "opened", host.opened),
        *_fill(t, "private", PRIVATE),
        f"flush chain ip {t} forward",
        f'add rule ip {t} forward oifname "{br}" ct state established,related accept',
        f'add rule ip {t} forward oifname "{br}" counter drop',
        f'add rule ip {t} forward iifname "{br}" jump outbound',
        f"flush chain ip {t} outbound",
    ]
    if host.egress_interface:
        lines.append(f'add rule ip {t} outbound oifname != "{host.egress_interface}" counter drop')
    lines += [
        f"add rule ip {t} outbound ip daddr @never counter drop",
        f"add rule ip {t} outbound ip daddr @opened goto by_sandbox",
        f"add rule ip {t} outbound ip daddr @private counter drop",
        f"add rule ip {t} outbound goto by_sandbox",
        f"flush chain ip {t} by_sandbox",
        f"add rule ip {t} by_sandbox ip saddr vmap @policies",
        f"add rule ip {t} by_sandbox {default}",
        f"flush chain ip {t} postrouting",
        f"add rule ip {t} postrouting ip saddr {host.subnet} {out} masquerade",
    ]
    return "\n".join(lines) + "\n"


def remove_ruleset(host: EgressHost) -> str:
    return f"add table ip {host.table}\ndelete table ip {host.table}\n"


def _suffix(ip: str) -> str:
    return str(ipaddress.IPv4Address(ip)).replace(".", "_")


def _declare(table: str, ip: str) -> list[str]:
    s = _suffix(ip)
    return [
        f"add chain ip {table} sb_{s}",
        f"add set ip {table} allow_{s} {{ type ipv4_addr; flags interval; }}",
        f"add set ip {table} deny_{s} {{ type ipv4_addr; flags interval; }}",
        f"add set ip {table} pin_{s} {{ type ipv4_addr; flags timeout; }}",
    ]


def sandbox_ruleset(host: EgressHost, ip: str, policy: EgressPolicy) -> str:
    """Replace the rules of the sandbox at `ip` (its pins go: the domains may have changed)."""
    t, s = host.table, _suffix(ip)
    lines = [
        *_declare(t, ip),
        f"flush chain ip {t} sb_{s}",
        *_fill(t, f"allow_{s}", policy.allow_networks),
        *_fill(t, f"deny_{s}", policy.denied),
        f"flush set ip {t} pin_{s}",
        f"add rule ip {t} sb_{s} ip daddr @allow_{s} accept",
        f"add rule ip {t} sb_{s} ip daddr @pin_{s} accept",
        f"add rule ip {t} sb_{s} ip daddr @deny_{s} counter drop",
        f"add rule ip {t} sb_{s} accept",
        f"add element ip {t} policies {{ {ipaddress.IPv4Address(ip)} : goto sb_{s} }}",
    ]
    return "\n".join(lines) + "\n"


def clear_ruleset(host: EgressHost, ip: str) -> str:
    """Back to the host's default for `ip`; loads whether or not it had rules of its own."""
    t, s = host.table, _suffix(ip)
    addr = ipaddress.IPv4Address(ip)
    lines = [
        *_declare(t, ip),
        # Added first so that the delete below always has something to delete.
        f"add element ip {t} policies {{ {addr} : goto sb_{s} }}",
        f"delete element ip {t} policies {{ {addr} }}",
        f"flush chain ip {t} sb_{s}",
        f"delete chain ip {t} sb_{s}",
        f"delete set ip {t} allow_{s}",
        f"delete set ip {t} deny_{s}",
        f"delete set ip {t} pin_{s}",
    ]
    return "\n".join(lines) + "\n"


def pin_ruleset(host: EgressHost, ip: str, addresses: Iterable[str]) -> str:
    """Let `addresses` (answered for an allowed domain) through for PIN_SECONDS from now."""
    t, s = host.table, _suffix(ip)
    lines: list[str] = []
    for a in dict.fromkeys(str(ipaddress.IPv4Address(a)) for a in addresses):
        # add, delete, add: a fresh timeout whether or not the address was pinned already
        element = f"{{ {a} timeout {PIN_SECONDS}s }}"
        lines += [
            f"add element ip {t} pin_{s} {element}",
            f"delete element ip {t} pin_{s} {{ {a} }}",
            f"add element ip {t} pin_{s} {element}",
        ]
    return "\n".join(lines) + "\n" if lines else ""
