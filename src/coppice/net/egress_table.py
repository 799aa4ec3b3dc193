"""A bridge's egress table on this host: installed with the bridge, changed per sandbox.

Forwarding is switched on for the bridge only once the table that judges every forwarded
packet is in place, and off again before the table goes, so there is no moment in which a
sandbox's packets are routed unjudged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import Path

from coppice.config import NetworkSettings, Settings
from coppice.egress_policy import EgressPolicy
from coppice.errors import InvalidRequest
from coppice.net import egress_rules, nft, sysctl
from coppice.net.egress_rules import EgressHost


def egress_host(settings: Settings, network: NetworkSettings) -> EgressHost:
    others = [
        str(n.network)
        for n in (settings.jail_network, settings.vm_network)
        if n.subnet != network.subnet
    ]
    return EgressHost(
        bridge=network.bridge,
        subnet=str(network.network),
        sandbox_ranges=(*others, settings.build_subnet),
        egress_interface=settings.egress_interface,
        opened=tuple(_opened(settings.egress_private_allowed)),
        internet_by_default=settings.internet_access,
    )


def _opened(text: str) -> list[str]:
    found = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            found.append(str(ipaddress.IPv4Network(item, strict=False)))
        except ValueError:
            raise InvalidRequest(
                f"egress_private_allowed: {item!r} is not an IPv4 CIDR block (e.g. 10.1.0.0/16)"
            ) from None
    return found


class SandboxEgress:
    """What sandboxes on one bridge may reach; every change is one nft transaction."""

    def __init__(self, settings: Settings, network: NetworkSettings) -> None:
        self.host = egress_host(settings, network)

    @property
    def internet_by_default(self) -> bool:
        return self.host.internet_by_default

    def ensure(self) -> None:
        """After the bridge exists; keeps the rules of sandboxes already running."""
        nft.load(
            egress_rules.base_ruleset(self.host), f"install the egress table of {self.host.bridge}"
        )
        sysctl.write("net/ipv4/ip_forward", "1")
        sysctl.write(f"net/ipv4/conf/{self.host.bridge}/forwarding", "1")

    def remove(self) -> None:
        conf = Path(f"/proc/sys/net/ipv4/conf/{self.host.bridge}/forwarding")
        if conf.exists():
            sysctl.write(f"net/ipv4/conf/{self.host.bridge}/forwarding", "0")
        nft.load(egress_rules.remove_ruleset(self.host), f"remove {self.host.table}")

    def set(self, ip: str, policy: EgressPolicy | None) -> None:
        """Give the sandbox at `ip` its own rules, or (None, or a policy that is the host's
        default anyway) none."""
        if policy is None or policy.is_plain(self.host.internet_by_default):
            self.clear(ip)
            return
        nft.load(egress_rules.sandbox_ruleset(self.host, ip, policy), f"set the egress of {ip}")

    def clear(self, ip: str) -> None:
        nft.load(egress_rules.clear_ruleset(self.host, ip), f"clear the egress of {ip}")

    def pin(self, ip: str, addresses: Iterable[str]) -> None:
        nft.load(egress_rules.pin_ruleset(self.host, ip, addresses), f"pin addresses for {ip}")

    def reset(self, policies: Mapping[str, EgressPolicy]) -> None:
        """Make the table hold exactly `policies` (by sandbox address): after a restart, with
        the store as the truth. One transaction: no sandbox is ever without its rules."""
        script = egress_rules.remove_ruleset(self.host) + egress_rules.base_ruleset(self.host)
        for ip, policy in policies.items():
            if not policy.is_plain(self.host.internet_by_default):
                script += egress_rules.sandbox_ruleset(self.host, ip, policy)
        nft.load(script, f"restore the egress rules of {self.host.bridge}")
