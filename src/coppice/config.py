"""Settings: host paths, networks, limits. Defaults, then a TOML file, then environment.

The file is `/etc/coppice/config.toml` (or `$COPPICE_CONFIG`); every key of `Settings` may
appear at top level, and `COPPICE_<KEY>` environment variables override it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coppice.errors import InvalidRequest

DEFAULT_CONFIG_FILE = Path("/etc/coppice/config.toml")


@dataclass(frozen=True)
class NetworkSettings:
    """One substrate's network: a bridge on the host, a /24, and the range entries draw from."""

    bridge: str
    subnet: str
    first_host: int = 50
    last_host: int = 249

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def host_addresses(self) -> list[ipaddress.IPv4Address]:
        base = self.network.network_address
        return [base + i for i in range(self.first_host, self.last_host + 1)]


@dataclass(frozen=True)
class Limits:
    """Per-entry resource limits; a template may override any of them."""

    memory_mb: int = 512
    pids: int = 256
    cpus: float = 1.0
    disk_mb: int = 1024


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path("/var/lib/coppice")
    run_dir: Path = Path("/run/coppice")
    #: host-level download cache shared by every state dir (Debian packages for debootstrap)
    cache_dir: Path = Path("/var/cache/coppice")
    #: prefix of every host object Coppice owns (cgroups, network namespaces); lets a test
    #: instance live beside a production one without either touching the other's objects
    namespace: str = "coppice"
    jail_network: NetworkSettings = field(
        default_factory=lambda: NetworkSettings("coppicenet0", "10.78.0.0/24")
    )
    vm_network: NetworkSettings = field(
        default_factory=lambda: NetworkSettings("coppbr0", "10.77.0.0/24")
    )
    limits: Limits = field(default_factory=Limits)
    #: host uid/gid that root inside a jail maps to, and how many ids the jail gets
    jail_uid_base: int = 1_000_000
    jail_uid_count: int = 65536
    #: Debian mirror for template builds; empty means the one the host's apt uses
    debian_mirror: str = ""
    #: private range each template build's /30 link to the host is cut from; kept clear of
    #: the jail and vm networks (production's and the test instance's alike)
    build_subnet: str = "10.79.240.0/20"
    #: package sources a template build may reach beyond the host's own apt, pip and npm
    #: configuration: "host" (ports 80 and 443) or "host:port", comma-separated
    build_allowed_hosts: str = ""
    # -- sandbox egress --
    #: whether a sandbox reaches the internet when its create request does not say (E2B's
    #: `allow_internet_access` defaults to true)
    internet_access: bool = True
    #: the one host interface sandbox traffic may leave by (empty: whichever the host's
    #: routes pick); a test instance names its own test network here so no sandbox packet
    #: can leave the machine
    egress_interface: str = ""
    #: private networks of the host's (RFC 1918 and the like, blocked by default) that
    #: sandboxes may reach, subject to their own rules: CIDRs, comma-separated
    egress_private_allowed: str = ""
    #: DNS servers the sandboxes' resolver asks, comma-separated; empty: the host's own
    #: (/etc/resolv.conf)
    dns_upstreams: str = ""
    ready_timeout_s: float = 30.0
    #: start jail entries as forks of a per-template zygote that has done the agent's
    #: imports once (substrates/jail_zygote.py); off, or where a template's zygote cannot
    #: start, every entry starts its own interpreters under bwrap
    jail_zygote: bool = True
    #: how many entries one warm starts at the same time
    spawn_parallelism: int = 8
    #: the same for VMs: under TCG each restoring clone keeps a CPU busy, so more at once
    #: than there are CPUs only makes all of them late for their readiness deadline
    vm_spawn_parallelism: int = 2
    # -- gateway (`coppice serve`) --
    #: pools the service keeps at size: "template=count,template=count"
    pool_targets: str = "base=2,code-interpreter-v1=2"
    #: API keys: "key" (every scope) or "tenant:key:scope|scope", comma-separated; empty
    #: means no authentication, and then the gateway refuses to listen beyond loopback
    api_keys: str = ""
    #: a file with more keys in the same format, one or more per line ("#" starts a comment)
    api_keys_file: str = ""
    #: start a sandbox on demand when its pool is empty (else answer 429 with Retry-After)
    cold_start: bool = True
    #: entries the host starts at once, cold starts and refills together (0: two per CPU);
    #: a refill takes a slot only while no create is waiting for one
    spawn_slots: int = 0
    #: how long a create may wait for an entry (a refill landing or a cold start) before
    #: its 429 with Retry-After; one that would wait longer at the rate entries arrive is
    #: refused at once
    admission_deadline_s: float = 30.0
    #: creates that may wait at once, over all templates
    admission_queue_max: int = 1000
    #: sandboxes and warm entries the host holds at most, over all templates (0: as many as
    #: the substrates have addresses)
    max_sandboxes: int = 0
    #: below this much available memory (MemAvailable) the host starts no more entries
    min_free_memory_mb: int = 256
    #: the most warm entries a template's pool grows to when demand asks for more
    pool_max: int = 100
    #: memory all warm pools may hold together (0: a quarter of the host's RAM); a pool that
    #: would grow past it stops at what fits, never below its configured size
    pool_memory_mb: int = 0
    #: how long a burst of creates keeps its pool large (seconds since the burst)
    pool_burst_memory_s: float = 600.0
    default_timeout_s: int = 300
    max_timeout_s: int = 86400
    #: how long a sandbox that died (out of memory, a crash, a host restart) is remembered:
    #: GET /sandboxes/{id} and its in-sandbox traffic answer when and why it died
    dead_sandbox_keep_s: float = 3600.0
    #: template builds the gateway runs at once (each keeps CPUs busy; one template's builds
    #: always run one after the other)
    template_build_parallelism: int = 1
    #: warm entries a template built through the build API gets unless pool_targets names it
    #: (E2B users expect their own templates to start as fast as the defaults)
    built_template_pool_target: int = 1
    #: disk that snapshots and files-only paused sandboxes may hold together, in MB; a
    #: snapshot or pause past it is refused with the list of what to delete to make room
    snapshot_disk_mb: int = 20480
    #: wildcard domain for host-based routing (`<port>-<sandbox id>.<domain>`); empty: any
    sandbox_domain: str = ""

    def pool_target_map(self) -> dict[str, int]:
        targets: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in self.pool_targets.split(","))):
            name, sep, count = item.partition("=")
            if not sep or not name.strip() or not count.strip().isdigit():
                raise InvalidRequest(
                    f"pool_targets item {item!r} is not TEMPLATE=COUNT (e.g. python=4)"
                )
            targets[name.strip()] = int(count)
        return targets

    @property
    def database_path(self) -> Path:
        return self.state_dir / "coppice.db"

    @property
    def snapshots_dir(self) -> Path:
        """One directory per snapshot (and per fork's passing snapshot), named by its id."""
        return self.state_dir / "snapshots"

    @property
    def templates_dir(self) -> Path:
        return self.state_dir / "templates"

    @property
    def build_cache_dir(self) -> Path:
        return self.state_dir / "build-cache"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def entries_dir(self) -> Path:
        return self.run_dir / "entries"

    @property
    def entry_disks_dir(self) -> Path:
        """Jail entries' disk images: on the host's disk, not in run_dir (a tmpfs)."""
        return self.state_dir / "entry-disks"

    @property
    def deb_cache_dir(self) -> Path:
        return self.cache_dir / "debs"

    @classmethod
    def load(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        path = Path(env.get("COPPICE_CONFIG", str(DEFAULT_CONFIG_FILE)))
        if path.is_file():
            try:
                values.update(tomllib.loads(path.read_text()))
            except tomllib.TOMLDecodeError as exc:
                raise InvalidRequest(f"{path}: not valid TOML: {exc}") from exc
        for f in dataclasses.fields(cls):
            key = f"COPPICE_{f.name.upper()}"
            if key in env:
                values[f.name] = env[key]
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Settings:
        try:
            built: Settings = _build(cls, values, "")
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"invalid settings: {exc}") from exc
        return built


_NESTED: dict[str, type] = {
    "jail_network": NetworkSettings,
    "vm_network": NetworkSettings,
    "limits": Limits,
}


def _build(kind: type[Any], values: dict[str, Any], where: str) -> Any:
    """Instantiate a settings dataclass from loose values, converting each to its field type."""
    if not isinstance(values, dict):
        raise InvalidRequest(f"{where.rstrip('.')} must be a table, not {values!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(values) - set(fields)
    if unknown:
        raise InvalidRequest(f"unknown settings: {', '.join(where + u for u in sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        if name in _NESTED and kind is Settings:
            kwargs[name] = _build(_NESTED[name], raw, f"{name}.")
            continue
        default = getattr(kind(), name) if kind is not NetworkSettings else None
        target = type(default) if default is not None else str
        if name in ("first_host", "last_host"):
            target = int
        if isinstance(default, bool):
            kwargs[name] = _boolean(raw, f"{where}{name}")
            continue
        try:
            kwargs[name] = Path(raw) if isinstance(default, Path) else target(raw)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(
                f"setting {where}{name}: {raw!r} is not a valid {target.__name__}"
            ) from exc
    return kind(**kwargs)


def _boolean(raw: Any, name: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidRequest(f"setting {name}: {raw!r} is not a boolean (true or false)")
