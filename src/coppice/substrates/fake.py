"""The `fake` substrate: sandboxes that exist only in memory, for tests of everything above
the drivers (controller, keeper, gateway service, relay) without root, processes or images.

It is a driver like the others (one file, one registry line), which is the proof that a
driver needs nothing beyond the `Substrate` protocol. What it adds is for tests: every call
is recorded in `calls` in order, and a test can make it fail a spawn, never get ready, die
(with an exit status, as if its head had been reaped), give its sandboxes cgroups of a fake
cgroupfs (`cgroups`, for their OOM counters), or point the gateway at an agent of its own
(`agent`), such as a loopback envd app.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from coppice.config import NetworkSettings, Settings
from coppice.egress_policy import EgressPolicy
from coppice.errors import SandboxDied, SandboxNotReady, SubstrateError
from coppice.resource_usage import ResourceUsage
from coppice.substrates.base import AGENT_PORT, Handle, HostObjects, SpawnSpec
from coppice.substrates.cgroups import CgroupDriver
from coppice.substrates.children import EXITS

#: a range no real bridge uses; nothing is ever configured on it
FAKE_NETWORK = NetworkSettings(bridge="fake0", subnet="10.254.0.0/24", first_host=10, last_host=59)


@dataclass
class FakeSandbox:
    ip: str
    paused: bool = False
    alive: bool = True
    #: what `usage` reports; a test sets it (None: the driver cannot tell)
    usage: ResourceUsage | None = None


@dataclass
class FakeEgress:
    """Egress rules kept in memory, by sandbox address, for tests to read."""

    internet_by_default: bool = True
    policies: dict[str, EgressPolicy] = field(default_factory=dict)
    pinned: dict[str, set[str]] = field(default_factory=dict)

    def set(self, ip: str, policy: EgressPolicy | None) -> None:
        self.pinned.pop(ip, None)
        if policy is None or policy.is_plain(self.internet_by_default):
            self.policies.pop(ip, None)
        else:
            self.policies[ip] = policy

    def pin(self, ip: str, addresses: Iterable[str]) -> None:
        self.pinned.setdefault(ip, set()).update(addresses)

    def reset(self, policies: Mapping[str, EgressPolicy]) -> None:
        self.policies = {
            ip: p for ip, p in policies.items() if not p.is_plain(self.internet_by_default)
        }
        self.pinned.clear()


@dataclass
class FakeSubstrate:
    settings: Settings
    name: str = "fake"
    network: NetworkSettings = FAKE_NETWORK
    spawn_parallelism: int = 4
    #: where every sandbox's agent answers (host, port); None: the entry's own address
    agent: tuple[str, int] | None = None
    #: spawns still to fail, and entries that will never become ready
    failing_spawns: int = 0
    never_ready: set[str] = field(default_factory=set)
    #: called inside wait_ready, so a test can hold a warm at a chosen point
    on_wait_ready: Callable[[str], None] | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)
    sandboxes: dict[str, FakeSandbox] = field(default_factory=dict)
    templates_forgotten: list[str] = field(default_factory=list)
    egress: FakeEgress = field(default_factory=FakeEgress)
    #: where each sandbox's cgroup is (named by its entry id), as the jail has one; None: none
    cgroups: CgroupDriver | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def _record(self, call: str, entry_id: str = "") -> None:
        with self._lock:
            self.calls.append((call, entry_id))

    def calls_for(self, entry_id: str) -> list[str]:
        with self._lock:
            return [call for call, who in self.calls if who == entry_id]

    # -- host ---------------------------------------------------------------------------------

    def check_prerequisites(self) -> None:
        self._record("check_prerequisites")

    def prepare_host(self) -> None:
        self._record("prepare_host")

    def teardown_host(self) -> None:
        self._record("teardown_host")

    # -- one entry ----------------------------------------------------------------------------

    def spawn(self, spec: SpawnSpec) -> Handle:
        self._record("spawn", spec.entry_id)
        with self._lock:
            if self.failing_spawns > 0:
                self.failing_spawns -= 1
                raise SubstrateError(f"fake spawn of {spec.entry_id} failed (as asked)")
            self.sandboxes[spec.entry_id] = FakeSandbox(spec.ip)
        return Handle(head=None, detail="fake", driver={"ip": spec.ip})

    def wait_ready(self, spec: SpawnSpec, handle: Handle, timeout_s: float) -> None:
        self._record("wait_ready", spec.entry_id)
        if self.on_wait_ready is not None:
            self.on_wait_ready(spec.entry_id)
        if spec.entry_id in self.never_ready:
            raise SandboxNotReady(f"fake entry {spec.entry_id} never answered (as asked)")

    def _sandbox(self, entry_id: str) -> FakeSandbox:
        with self._lock:
            found = self.sandboxes.get(entry_id)
        if found is None or not found.alive:
            raise SandboxDied(entry_id)
        return found

    def pause(self, entry_id: str, handle: Handle | None) -> None:
        self._record("pause", entry_id)
        self._sandbox(entry_id).paused = True

    def resume(self, entry_id: str, handle: Handle | None) -> None:
        self._record("resume", entry_id)
        self._sandbox(entry_id).paused = False

    def is_alive(self, entry_id: str, handle: Handle | None) -> bool:
        with self._lock:
            found = self.sandboxes.get(entry_id)
        return found is not None and found.alive

    def agent_address(self, handle: Handle) -> tuple[str, int]:
        return self.agent if self.agent is not None else (str(handle.driver["ip"]), AGENT_PORT)

    def destroy(self, entry_id: str, handle: Handle | None) -> None:
        self._record("destroy", entry_id)
        with self._lock:
            self.sandboxes.pop(entry_id, None)

    def usage(self, entry_id: str, handle: Handle | None) -> ResourceUsage | None:
        with self._lock:
            sandbox = self.sandboxes.get(entry_id)
        return None if sandbox is None or not sandbox.alive else sandbox.usage

    def console_log(self, entry_id: str) -> Path:
        return self.settings.run_dir / "fake" / entry_id / "console.log"

    def forget_template(self, template_name: str) -> None:
        self._record("forget_template", template_name)
        self.templates_forgotten.append(template_name)

    def host_objects(self) -> HostObjects:
        with self._lock:
            return HostObjects({"sandboxes": set(self.sandboxes)})

    # -- what tests do to it ------------------------------------------------------------------

    def kill(self, entry_id: str, exit_status: int | None = None) -> None:
        """The sandbox dies on its own (OOM, a host-side kill), leaving its host objects;
        with `exit_status`, as a driver that reaped its head process would have seen it."""
        with self._lock:
            self.sandboxes[entry_id].alive = False
        if exit_status is not None:
            EXITS.record(entry_id, exit_status)

    def leave_behind(self, entry_id: str) -> None:
        """A host object the database does not know (a crash between spawn and record)."""
        with self._lock:
            self.sandboxes[entry_id] = FakeSandbox("10.254.0.250")
