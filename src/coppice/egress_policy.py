"""A sandbox's egress policy as E2B's API states it, and the decisions that follow from it.

E2B's rules: `allow_internet_access` (false means the same as denying 0.0.0.0/0),
`network.allowOut` (CIDRs, bare IPs or domain names, `*.` wildcards allowed) and
`network.denyOut` (CIDRs or IPs only); an allowed destination beats a denied one. Everything
here is pure: the host's firewall (net/egress_table.py) and resolver (net/resolver.py) carry
the decisions out.

Domains cannot be matched in a packet filter, so a domain rule is enforced by the resolver the
sandbox is given: the addresses it answers for an allowed name are pinned into the sandbox's
allow set for as long as the answer may be used, and nothing else is. A sandbox that resolves
names elsewhere, or connects to an address it guessed, meets the deny rules like any packet.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from coppice.errors import InvalidRequest

ALL_TRAFFIC = ipaddress.IPv4Network("0.0.0.0/0")
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def parse_network(text: str, field: str) -> ipaddress.IPv4Network | None:
    """`text` as an IPv4 network (a bare address is its /32); None when it is no address."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    if net.version != 4:
        raise InvalidRequest(
            f"{field}: {text!r} is an IPv6 range; sandboxes have IPv4 networking only"
        )
    assert isinstance(net, ipaddress.IPv4Network)
    return net


def parse_domain(text: str, field: str) -> str:
    """A domain name or `*.`-wildcard pattern, lower-cased, without a trailing dot."""
    name = text.strip().lower().rstrip(".")
    if name == "*":
        return name
    bare = name[2:] if name.startswith("*.") else name
    labels = bare.split(".")
    if not bare or len(bare) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidRequest(
            f"{field}: {text!r} is neither an IPv4 address or CIDR block nor a domain name "
            "(e.g. 8.8.8.8, 10.0.0.0/8, example.com, *.example.com)"
        )
    return name


def domain_matches(pattern: str, name: str) -> bool:
    """`example.com` matches only itself; `*.example.com` matches its subdomains (not the
    bare domain, as a TLS wildcard would not); `*` matches every name."""
    name = name.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


@dataclass(frozen=True)
class EgressPolicy:
    allow_internet: bool = True
    #: IPv4 networks allowed whatever the deny rules say
    allow_networks: tuple[ipaddress.IPv4Network, ...] = ()
    #: domain names (or patterns) allowed, enforced through the resolver
    allow_domains: tuple[str, ...] = ()
    deny_networks: tuple[ipaddress.IPv4Network, ...] = ()

    @classmethod
    def parse(
        cls,
        allow_internet: bool,
        allow_out: list[str] | tuple[str, ...] = (),
        deny_out: list[str] | tuple[str, ...] = (),
    ) -> EgressPolicy:
        networks: list[ipaddress.IPv4Network] = []
        domains: list[str] = []
        for item in allow_out:
            net = parse_network(item, "network.allowOut")
            if net is None:
                domains.append(parse_domain(item, "network.allowOut"))
            else:
                networks.append(net)
        denied: list[ipaddress.IPv4Network] = []
        for item in deny_out:
            net = parse_network(item, "network.denyOut")
            if net is None:
                raise InvalidRequest(
                    f"network.denyOut: {item!r} is not an IPv4 address or CIDR block; deny "
                    "rules take addresses only (to allow only some domains, deny 0.0.0.0/0 "
                    "and allow the domains)"
                )
            denied.append(net)
        return cls(
            allow_internet,
            tuple(dict.fromkeys(networks)),
            tuple(dict.fromkeys(domains)),
            tuple(dict.fromkeys(denied)),
        )

    # -- what the host does about it ------------------------------------------------------

    @property
    def denied(self) -> tuple[ipaddress.IPv4Network, ...]:
        """The deny rules in force, internet access turned off included."""
        if self.allow_internet or ALL_TRAFFIC in self.deny_networks:
            return self.deny_networks
        return (ALL_TRAFFIC, *self.deny_networks)

    @property
    def denies_everything(self) -> bool:
        return ALL_TRAFFIC in self.denied

    def is_plain(self, internet_by_default: bool) -> bool:
        """Does it do what a sandbox without rules of its own gets (the host's default
        verdict), so that it needs no firewall rules of its own?"""
        if internet_by_default:
            return not self.denied  # allowances without denials change nothing
        return self.denies_everything and not self.allowances

    @property
    def allowances(self) -> bool:
        return bool(self.allow_networks or self.allow_domains)

    def allows_name(self, name: str) -> bool:
        return any(domain_matches(p, name) for p in self.allow_domains)

    def answers_name(self, name: str) -> bool:
        """Does the resolver answer `name` for this sandbox? A sandbox that may reach the
        internet resolves anything. One that may not resolves only its allowed domains, so
        its queries carry no data out either (a DNS tunnel needs answers)."""
        return not self.denies_everything or self.allows_name(name)

    def pins_name(self, name: str) -> bool:
        """Must the addresses answered for `name` be let through the deny rules?"""
        return bool(self.denied) and self.allows_name(name)

    # -- as E2B shows it, and as the store keeps it ---------------------------------------

    def allow_out(self) -> list[str]:
        return [*(str(n) for n in self.allow_networks), *self.allow_domains]

    def deny_out(self) -> list[str]:
        return [str(n) for n in self.deny_networks]

    def to_json(self) -> str:
        return json.dumps(
            {
                "allow_internet": self.allow_internet,
                "allow_out": self.allow_out(),
                "deny_out": self.deny_out(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> EgressPolicy:
        data: dict[str, Any] = json.loads(text)
        return cls.parse(bool(data["allow_internet"]), data["allow_out"], data["deny_out"])
