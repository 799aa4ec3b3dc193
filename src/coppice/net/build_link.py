"""The network of one template build: a namespace whose only way out is the package proxy.

A build's commands run as root of their image, on code fetched from anywhere, so their network
is no network but this: a named namespace with one veth to the host, addresses from a /30 of
the `build_subnet` setting, a default route via the host end, and an nftables table on the host
that lets the sandbox end reach the host end's address on the proxy's port and drops every other
packet arriving from it, for the host (input) and for anywhere else (forward). The proxy
(package_proxy.py) passes on requests to the host's own package sources only.

Every object is named by the `namespace` setting (`<namespace>-b<id>` for the namespace, the
host veth carries that name as its alias, the table is `<namespace>_build_<id>`), and a running
build holds a lock in the instance's run directory for as long as they exist: what is found
without its lock held belongs to a build that crashed, and `leftover_build_networks` and
`remove_build_network` sweep it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import socket
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from coppice.config import Settings
from coppice.errors import (
    CapacityExceeded,
    Conflict,
    InvalidRequest,
    SubstrateError,
)
from coppice.host import mounts
from coppice.images.file_lock import locked
from coppice.images.package_sources import PackageSources
from coppice.net import nft, sysctl
from coppice.net.package_proxy import PackageProxy

log = logging.getLogger("coppice.build.network")

NETNS_DIR = Path("/run/netns")
#: 5 + 8 characters: within IFNAMSIZ, and never the length of an entry's `copp<id>` veth
HOST_LINK_PREFIX = "coppb"
SANDBOX_LINK = "eth0"
#: host-wide, not per instance: every instance cuts its /30s from whatever the host has free,
#: and two builds must not both find the same one free
SUBNET_LOCK = Path("/run/lock/coppice-build-subnets.lock")
_SHORT_ID = re.compile(r"[0-9a-f]{8}")
_T = TypeVar("_T")


def short_id(settings: Settings, build_id: str) -> str:
    """Eight hex digits naming a build's objects. The namespace is part of the digest, so two
    instances never pick the same veth name, which has room for no prefix."""
    digest = hashlib.blake2s(f"{settings.namespace}\0{build_id}".encode(), digest_size=4)
    return digest.hexdigest()


def netns_name(settings: Settings, short: str) -> str:
    return f"{settings.namespace}-b{short}"


def host_link_name(short: str) -> str:
    return f"{HOST_LINK_PREFIX}{short}"


def table_name(settings: Settings, short: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{settings.namespace}_build_{short}")


def _lock_path(settings: Settings, short: str) -> Path:
    return settings.run_dir / "build-networks" / f"{netns_name(settings, short)}.lock"


def confinement_ruleset(table: str, link: str, host_address: str, proxy_port: int | None) -> str:
    """One nft transaction replacing `table` atomically. Without a port (while the proxy is
    not up yet) nothing from the link passes at all."""
    allow = (
        f'    iifname "{link}" ip daddr {host_address} tcp dport {proxy_port} accept\n'
        if proxy_port is not None
        else ""
    )
    return (
        f"table inet {table} {{}}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f"{allow}"
        f'    iifname "{link}" counter drop\n'
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{link}" counter drop\n'
        f'    oifname "{link}" counter drop\n'
        "  }\n"
        "}\n"
    )


def build_pool(settings: Settings) -> ipaddress.IPv4Network:
    """The `build_subnet` setting, checked against the substrates' own networks."""
    try:
        pool = ipaddress.IPv4Network(settings.build_subnet)
    except ValueError as exc:
        raise InvalidRequest(
            f"setting build_subnet: {settings.build_subnet!r} is not an IPv4 network "
            "(e.g. 10.79.240.0/20)"
        ) from exc
    if pool.prefixlen > 30:
        raise InvalidRequest(
            f"setting build_subnet: {pool} is smaller than one build's /30; use /30 or wider"
        )
    for name, other in (
        ("jail_network", settings.jail_network),
        ("vm_network", settings.vm_network),
    ):
        if pool.overlaps(other.network):
            raise InvalidRequest(
                f"setting build_subnet: {pool} overlaps {name} ({other.network}); "
                "choose a range apart from both"
            )
    return pool


def _free_subnet(ipr: IPRoute, pool: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    taken = [
        ipaddress.IPv4Network(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}", strict=False)
        for msg in ipr.get_addr(family=socket.AF_INET)
    ]
    for candidate in pool.subnets(new_prefix=30):
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise CapacityExceeded(
        f"every /30 of build_subnet {pool} is in use on this host; wait for a build to end, "
        "or widen the build_subnet setting"
    )


class BuildNetwork:
    """`with BuildNetwork(settings, build_id) as net:` run the build's commands under
    `nsenter --net=net.netns_path` with `net.sources.env(net.proxy_url)`."""

    def __init__(self, settings: Settings, build_id: str) -> None:
        self.settings = settings
        self.build_id = build_id
        self.short = short_id(settings, build_id)
        self.name = netns_name(settings, self.short)
        self.host_link = host_link_name(self.short)
        self.table = table_name(settings, self.short)
        self._subnet: ipaddress.IPv4Network | None = None
        self._sources: PackageSources | None = None
        self._proxy: PackageProxy | None = None
        self._lock_fd: int | None = None

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def host_address(self) -> str:
        return str(self._require(self._subnet, "subnet").network_address + 1)

    @property
    def sandbox_address(self) -> str:
        return str(self._require(self._subnet, "subnet").network_address + 2)

    @property
    def proxy_url(self) -> str:
        return self._require(self._proxy, "proxy").url

    @property
    def sources(self) -> PackageSources:
        return self._require(self._sources, "package sources")

    def _require(self, value: _T | None, what: str) -> _T:
        if value is None:
            raise SubstrateError(f"build network {self.name} has no {what}: enter it first")
        return value

    def __enter__(self) -> BuildNetwork:
        nft.require()
        pool = build_pool(self.settings)
        sweep_leftovers(self.settings)
        self._lock_fd = _take_lock(_lock_path(self.settings, self.short))
        if self._lock_fd is None:
            raise Conflict(f"build network {self.name} is already in use by another build")
        try:
            self._sources = PackageSources.from_host(self.settings)
            self._create(pool)
        except BaseException:
            self._close_under(failure=True)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close_under(failure=exc is not None)

    def _close_under(self, failure: bool) -> None:
        """Tear down; when the build already failed, its own error is the one to report,
        and what could not be removed is left to the next sweep."""
        try:
            self._close()
        except SubstrateError as exc:
            if not failure:
                raise
            log.warning("%s", exc)

    def _create(self, pool: ipaddress.IPv4Network) -> None:
        try:
            netns.create(self.name)
            with IPRoute() as ipr:
                with locked(SUBNET_LOCK):
                    self._subnet = _free_subnet(ipr, pool)
                    ipr.link(
                        "add",
                        ifname=self.host_link,
                        kind="veth",
                        peer={"ifname": SANDBOX_LINK, "net_ns_fd": self.name},
                    )
                    idx = ipr.link_lookup(ifname=self.host_link)[0]
                    ipr.link("set", index=idx, ifalias=self.name)
                    ipr.addr("add", index=idx, address=self.host_address, prefixlen=30)
                # Closed before the link comes up, so not one packet finds it open.
                nft.load(
                    confinement_ruleset(self.table, self.host_link, self.host_address, None),
                    "install the build network's firewall",
                )
                sysctl.write(f"net/ipv4/conf/{self.host_link}/forwarding", "0")
                sysctl.write(f"net/ipv6/conf/{self.host_link}/disable_ipv6", "1")
                ipr.link("set", index=idx, state="up")
            with IPRoute(netns=self.name) as inner:
                lo = inner.link_lookup(ifname="lo")[0]
                eth = inner.link_lookup(ifname=SANDBOX_LINK)[0]
                inner.addr("add", index=eth, address=self.sandbox_address, prefixlen=30)
                inner.link("set", index=lo, state="up")
                inner.link("set", index=eth, state="up")
                inner.route("add", dst="0.0.0.0/0", gateway=self.host_address)
        except (NetlinkError, OSError) as exc:
            raise SubstrateError(f"cannot set up build network {self.name}: {exc}") from exc
        self._proxy = PackageProxy(self.sources.hosts, host=self.host_address).start()
        port = self._proxy.port
        nft.load(
            confinement_ruleset(self.table, self.host_link, self.host_address, port),
            "install the build network's firewall",
        )
        log.info(
            "build network %s: %s, proxy %s, package sources %s",
            self.name,
            self._subnet,
            self._proxy.url,
            self.sources.described_hosts(),
        )

    def _close(self) -> None:
        proxy, self._proxy = self._proxy, None
        try:
            if proxy is not None:
                proxy.stop()
            _remove_objects(self.settings, self.short)
        finally:
            if self._lock_fd is not None:
                _drop_lock(_lock_path(self.settings, self.short), self._lock_fd)
                self._lock_fd = None


def leftover_build_networks(settings: Settings) -> list[str]:
    """Build networks of this instance whose build is gone: objects on the host with no
    build holding their lock."""
    shorts = _shorts_on_host(settings)
    lock_dir = settings.run_dir / "build-networks"
    if lock_dir.is_dir():
        prefix = f"{settings.namespace}-b"
        for path in lock_dir.glob("*.lock"):
            if path.stem.startswith(prefix) and _SHORT_ID.fullmatch(path.stem[len(prefix) :]):
                shorts.add(path.stem[len(prefix) :])
    return sorted(netns_name(settings, s) for s in shorts if not _in_use(settings, s))


def remove_build_network(settings: Settings, name: str) -> None:
    """Remove a crashed build's namespace, veth, nft table and lock; refuses one in use."""
    prefix = f"{settings.namespace}-b"
    short = name[len(prefix) :]
    if not name.startswith(prefix) or not _SHORT_ID.fullmatch(short):
        raise InvalidRequest(
            f"{name!r} is not a build network of namespace {settings.namespace!r}; "
            "leftover_build_networks() lists those"
        )
    path = _lock_path(settings, short)
    fd = _take_lock(path)
    if fd is None:
        raise Conflict(f"build network {name} belongs to a running build; it goes when that ends")
    try:
        _remove_objects(settings, short)
    finally:
        _drop_lock(path, fd)


def sweep_leftovers(settings: Settings) -> list[str]:
    """Remove every leftover build network; returns their names. A failure is logged, not
    raised: a stale namespace must not stop the next build."""
    removed = []
    for name in leftover_build_networks(settings):
        try:
            remove_build_network(settings, name)
            removed.append(name)
        except (Conflict, SubstrateError) as exc:
            log.warning("cannot remove leftover build network %s: %s", name, exc)
    return removed


def _shorts_on_host(settings: Settings) -> set[str]:
    prefix = f"{settings.namespace}-b"
    names: list[str] = []
    if NETNS_DIR.is_dir():
        names += [p.name for p in NETNS_DIR.iterdir()]
    with IPRoute() as ipr:
        names += [
            str(link.get_attr("IFLA_IFALIAS"))
            for link in ipr.get_links()
            if str(link.get_attr("IFLA_IFNAME")).startswith(HOST_LINK_PREFIX)
        ]
    found = {
        name[len(prefix) :]
        for name in names
        if name.startswith(prefix) and _SHORT_ID.fullmatch(name[len(prefix) :])
    }
    table_prefix = table_name(settings, "")
    for table in nft.tables("inet"):
        if table.startswith(table_prefix) and _SHORT_ID.fullmatch(table[len(table_prefix) :]):
            found.add(table[len(table_prefix) :])
    return found


def _remove_objects(settings: Settings, short: str) -> None:
    """Every object of one build network, each attempted whatever became of the others."""
    problems: list[str] = []
    path = NETNS_DIR / netns_name(settings, short)
    try:
        if path.exists():
            # An interrupted creation can leave the file without its bind mount.
            mounts.unmount(path)
            path.unlink(missing_ok=True)
    except OSError as exc:
        problems.append(f"namespace {path}: {exc}")
    link = host_link_name(short)
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=link)
            if found:
                ipr.link("del", index=found[0])
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:  # it went with its namespace just now
            problems.append(f"veth {link}: {exc}")
    table = table_name(settings, short)
    try:
        nft.load(f"table inet {table} {{}}\ndelete table inet {table}\n", f"delete {table}")
    except SubstrateError as exc:
        problems.append(f"nft table {table}: {exc}")
    if problems:
        raise SubstrateError(
            f"cannot remove all of build network {netns_name(settings, short)} "
            f"({'; '.join(problems)}); `coppice` sweeps it again before the next build"
        )


def _take_lock(path: Path) -> int | None:
    """The lock's descriptor, or None when a running build holds it."""
    for _attempt in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            break
        except FileNotFoundError:
            continue  # the last build to end removed the directory just now
    else:
        raise SubstrateError(f"cannot create the lock {path}: its directory keeps vanishing")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _drop_lock(path: Path, fd: int) -> None:
    path.unlink(missing_ok=True)
    os.close(fd)
    with contextlib.suppress(OSError):  # still holds another build's lock
        path.parent.rmdir()


def _in_use(settings: Settings, short: str) -> bool:
    path = _lock_path(settings, short)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
