"""The host bridge of one substrate: the gateway address its entries route through.

Entries hang off the bridge as *isolated* ports, which the bridge forwards only to and from
non-isolated ports (the host itself), so two sandboxes never exchange a frame. A new bridge
starts with forwarding off, so the host routes nothing of its sandboxes until the egress table
(egress_table.py) that judges each of their packets is in place and turns it on; the host
guard (host_guard.py) drops every connection a sandbox opens towards the host's own services.
"""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from coppice.config import NetworkSettings
from coppice.errors import SubstrateError
from coppice.net import sysctl
from coppice.net.host_guard import HostGuard
from coppice.store.ipam import mac_for

#: time between the host's ARP requests for an entry's address. The host probes a starting
#: sandbox before its address is up; with the kernel's 1 s, the first probe's ARP went
#: unanswered and the next try came a second later, so about one warm in three took 0.5 to
#: 1 s more (30 warms of `base`: 9 probes timed out at 0.5 s; none at 50 ms).
ARP_RETRANS_MS = 50


class HostBridge:
    def __init__(self, network: NetworkSettings) -> None:
        self.network = network

    @property
    def name(self) -> str:
        return self.network.bridge

    @property
    def mac(self) -> str:
        """The bridge's own MAC, derived from its gateway address like every entry's."""
        return mac_for(self.network.gateway)

    def index(self, ipr: IPRoute) -> int | None:
        found = ipr.link_lookup(ifname=self.name)
        return int(found[0]) if found else None

    def exists(self) -> bool:
        with IPRoute() as ipr:
            return self.index(ipr) is not None

    def ensure(self) -> None:
        """Create the bridge with its gateway address if missing; a no-op when it is there."""
        try:
            with IPRoute() as ipr:
                idx = self.index(ipr)
                created = idx is None
                if idx is None:
                    try:
                        ipr.link("add", ifname=self.name, kind="bridge")
                    except NetlinkError as exc:
                        if exc.code != 17:  # EEXIST: a concurrent init made it first
                            raise
                    idx = self.index(ipr)
                    assert idx is not None
                # A bridge without an address of its own takes its lowest port's, and changes
                # it when that port goes: every sandbox's neighbour entry for the gateway is
                # then stale, and its answers go to a MAC no longer there until ARP gives up
                # on it (seen as 13 s stalls of TCP retransmits). A fixed MAC never moves.
                mac = self.mac
                if ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS") != mac:
                    ipr.link("set", index=idx, address=mac)
                gw = str(self.network.gateway)
                have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
                if gw not in have:
                    ipr.addr("add", index=idx, address=gw, prefixlen=self.network.prefixlen)
                ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise SubstrateError(f"cannot set up bridge {self.name}: {exc}") from exc
        if created:
            sysctl.write(f"net/ipv4/conf/{self.name}/forwarding", "0")
        sysctl.write(f"net/ipv6/conf/{self.name}/disable_ipv6", "1")
        sysctl.write(f"net/ipv4/neigh/{self.name}/retrans_time_ms", str(ARP_RETRANS_MS))
        HostGuard(self.name).ensure()

    def remove(self) -> None:
        with IPRoute() as ipr:
            idx = self.index(ipr)
            if idx is not None:
                ipr.link("del", index=idx)
        HostGuard(self.name).remove()

    def port_names(self) -> set[str]:
        """Names of the interfaces enslaved to this bridge."""
        with IPRoute() as ipr:
            idx = self.index(ipr)
            if idx is None:
                return set()
            return {
                str(link.get_attr("IFLA_IFNAME"))
                for link in ipr.get_links()
                if link.get_attr("IFLA_MASTER") == idx
            }
