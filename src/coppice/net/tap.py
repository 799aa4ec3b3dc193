"""One VM's network: a persistent tap device, an isolated port of the substrate's bridge.

QEMU opens the tap by name (`-netdev tap,ifname=...`); the host creates it first so that QEMU
needs no helper scripts and the bridge port gets the same isolation as a jail's veth: the
bridge forwards its frames only to the host, never to another sandbox.
"""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from coppice.config import NetworkSettings
from coppice.errors import SubstrateError
from coppice.net.bridge import HostBridge

ENTRY_PREFIX = "ctap"
GOLDEN_PREFIX = "cgold"
ENODEV = 19
EEXIST = 17


def entry_tap_name(entry_id: str) -> str:
    return f"{ENTRY_PREFIX}{entry_id}"[:15]


class TapDevices:
    def __init__(self, network: NetworkSettings) -> None:
        self.bridge = HostBridge(network)

    def create(self, name: str) -> None:
        """Create `name` (replacing a stale one), enslave it to the bridge, isolated, up."""
        try:
            with IPRoute() as ipr:
                br = self.bridge.index(ipr)
                if br is None:
                    raise SubstrateError(
                        f"bridge {self.bridge.name} is missing; run `coppice pool init`"
                    )
                stale = ipr.link_lookup(ifname=name)
                if stale:
                    ipr.link("del", index=stale[0])
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
                idx = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=idx, master=br)
                ipr.brport("set", index=idx, isolated=1)
                ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise SubstrateError(f"cannot set up tap {name}: {exc}") from exc

    def remove(self, name: str) -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                return
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as exc:
                if exc.code != ENODEV:
                    raise SubstrateError(f"cannot remove tap {name}: {exc}") from exc

    def entry_ids(self) -> set[str]:
        """Entries with a tap on this substrate's bridge right now."""
        return {
            n[len(ENTRY_PREFIX) :] for n in self.bridge.port_names() if n.startswith(ENTRY_PREFIX)
        }

    def names_with_prefix(self, prefix: str) -> set[str]:
        with IPRoute() as ipr:
            return {
                str(link.get_attr("IFLA_IFNAME"))
                for link in ipr.get_links()
                if str(link.get_attr("IFLA_IFNAME")).startswith(prefix)
            }
