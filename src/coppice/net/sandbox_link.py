"""One entry's network: a named network namespace with a veth whose host end is an isolated
port of the substrate's bridge, the entry's address and a default route via the bridge.

The namespace is created (and owned) by the host, not by the sandbox's user namespace, so root
inside the sandbox cannot change its own address, routes or firewall.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from coppice.config import NetworkSettings
from coppice.errors import SubstrateError
from coppice.host import mounts
from coppice.net.bridge import HostBridge
from coppice.store.ipam import mac_for

NETNS_DIR = Path("/run/netns")
HOST_LINK_PREFIX = "copp"


_ENTRY_ID = re.compile(r"[0-9a-f]{10}")


class SandboxLink:
    def __init__(self, network: NetworkSettings, namespace_prefix: str) -> None:
        self.network = network
        self.bridge = HostBridge(network)
        self.prefix = f"{namespace_prefix}-"

    def netns_name(self, entry_id: str) -> str:
        return f"{self.prefix}{entry_id}"

    def netns_path(self, entry_id: str) -> Path:
        return NETNS_DIR / self.netns_name(entry_id)

    @staticmethod
    def host_link_name(entry_id: str) -> str:
        return f"{HOST_LINK_PREFIX}{entry_id}"[:15]

    def create(self, entry_id: str, ip: str) -> None:
        try:
            netns.create(self.netns_name(entry_id))
        except NetlinkError as exc:
            raise SubstrateError(f"cannot set up the network of entry {entry_id}: {exc}") from exc
        self._configure(entry_id, ip)

    def attach(self, entry_id: str, ip: str, pid: int) -> None:
        """Name the network namespace process `pid` made for itself (a zygote's fork, in its
        own user namespace: the host cannot make one it could join) and set it up as
        `create` does. The host is root of every user namespace below it, so the addresses
        and routes are set from here; the entry's root, without CAP_NET_ADMIN, cannot
        change them."""
        path = self.netns_path(entry_id)
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            path.touch(exist_ok=False)
            mounts.mount(f"/proc/{pid}/ns/net", path, "none", mounts.MS_BIND)
        except OSError as exc:
            raise SubstrateError(f"cannot name the network of entry {entry_id}: {exc}") from exc
        self._configure(entry_id, ip)

    def _configure(self, entry_id: str, ip: str) -> None:
        name = self.netns_name(entry_id)
        host_if = self.host_link_name(entry_id)
        try:
            with IPRoute() as ipr:
                br = self.bridge.index(ipr)
                if br is None:
                    raise SubstrateError(
                        f"bridge {self.bridge.name} is missing; run `coppice pool init`"
                    )
                ipr.link(
                    "add",
                    ifname=host_if,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": name, "address": mac_for(ip)},
                )
                idx = ipr.link_lookup(ifname=host_if)[0]
                ipr.link("set", index=idx, master=br)
                ipr.brport("set", index=idx, isolated=1)
                ipr.link("set", index=idx, state="up")
            with IPRoute(netns=name) as inner:
                eth0 = inner.link_lookup(ifname="eth0")[0]
                lo = inner.link_lookup(ifname="lo")[0]
                inner.addr(
                    "add",
                    index=eth0,
                    address=str(ipaddress.IPv4Address(ip)),
                    prefixlen=self.network.prefixlen,
                )
                inner.link("set", index=lo, state="up")
                inner.link("set", index=eth0, state="up")
                inner.route("add", dst="0.0.0.0/0", gateway=str(self.network.gateway))
        except NetlinkError as exc:
            raise SubstrateError(f"cannot set up the network of entry {entry_id}: {exc}") from exc

    def remove(self, entry_id: str) -> None:
        """Delete the namespace (its veth end goes with it) and any stray host end."""
        path = self.netns_path(entry_id)
        if path.exists():
            # A creation interrupted half-way can leave the file without its bind mount;
            # unmount tolerates that, so the file always goes.
            mounts.unmount(path)
            path.unlink(missing_ok=True)
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.host_link_name(entry_id))
            if found:
                try:
                    ipr.link("del", index=found[0])
                except NetlinkError as exc:
                    if exc.code != 19:  # ENODEV: it went away with the namespace just now
                        raise

    def entry_ids(self) -> set[str]:
        """Entries that have a namespace or a bridge port on this host right now. Only
        names shaped like entry ids count: a build's network shares the prefix."""
        found: set[str] = set()
        if NETNS_DIR.is_dir():
            found.update(
                p.name[len(self.prefix) :]
                for p in NETNS_DIR.iterdir()
                if p.name.startswith(self.prefix)
            )
        found.update(
            n[len(HOST_LINK_PREFIX) :]
            for n in self.bridge.port_names()
            if n.startswith(HOST_LINK_PREFIX)
        )
        return {name for name in found if _ENTRY_ID.fullmatch(name)}
