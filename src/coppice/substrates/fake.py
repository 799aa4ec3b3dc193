"""The `fake` substrate: sandboxes that exist only in memory, for tests of everything above
the drivers (controller, keeper, gateway service, relay) without root, processes or images.

It is a driver like the others (one file, one registry line), which is the proof that a
driver needs nothing beyond the `Substrate` protocol. What it adds is for tests: every call
is recorded in `calls` in order, and a test can make it fail a spawn, never get ready, die
(with an exit status, as if its head had been reaped), give its sandboxes cgroups of a fake
cgroupfs (`cgroups`, for their OOM counters), or point the gateway at an agent of its own
(`agent`), such as a loopback envd app.

Snapshots are real in the small: a sandbox has `files` and `memory` (dicts a test fills), a
snapshot writes them as JSON into the directory it is given (so sizes, leftovers and their
removal are real files), and sandboxes started from it read them back. `reboot` is a host
reboot: processes and frozen memory go, files stay.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from coppice.config import NetworkSettings, Settings
from coppice.egress_policy import EgressPolicy
from coppice.errors import SandboxDied, SandboxNotReady, SubstrateError
from coppice.resource_usage import ResourceUsage
from coppice.substrates.base import (
    AGENT_PORT,
    Handle,
    HostObjects,
    Persistence,
    SnapshotArtifact,
    SpawnSpec,
)
from coppice.substrates.cgroups import CgroupDriver
from coppice.substrates.children import EXITS

#: a range no real bridge uses; nothing is ever configured on it
FAKE_NETWORK = NetworkSettings(bridge="fake0", subnet="10.254.0.0/24", first_host=10, last_host=59)


@dataclass
class FakeSandbox:
    ip: str
    paused: bool = False
    #: its processes run (False once it died, or was stopped by a files-only pause)
    alive: bool = True
    #: what `usage` reports; a test sets it (None: the driver cannot tell)
    usage: ResourceUsage | None = None
    #: what it wrote (path -> content) and what its processes hold, for tests to set and read
    files: dict[str, str] = field(default_factory=dict)
    memory: dict[str, str] = field(default_factory=dict)
    #: its writable layer is on disk (False: lost with the host's disk)
    files_on_disk: bool = True
    #: how many times its processes were started (a resume from a files-only pause adds one)
    boots: int = 1


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
    #: what it keeps; a test makes it jail-like with Persistence(False, False)
    persistence: Persistence = field(default_factory=lambda: Persistence(True, True))
    #: snapshots still to fail (after writing part of their directory, as a crash would)
    failing_snapshots: int = 0
    #: processes starts (a resume from a files-only pause) still to fail
    failing_starts: int = 0

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

    def _sandbox(self, entry_id: str, running: bool = True) -> FakeSandbox:
        """The sandbox; with `running`, only while its processes run."""
        with self._lock:
            found = self.sandboxes.get(entry_id)
        if found is None or (running and not found.alive):
            raise SandboxDied(entry_id)
        return found

    def pause(self, entry_id: str, handle: Handle | None) -> None:
        self._record("pause", entry_id)
        self._sandbox(entry_id).paused = True

    def suspend(self, entry_id: str, handle: Handle | None) -> Handle:
        self._record("suspend", entry_id)
        self._sandbox(entry_id).paused = True
        assert handle is not None
        return handle

    def wake(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        self._record("wake", spec.entry_id)
        self._sandbox(spec.entry_id).paused = False
        assert handle is not None
        return handle

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

    # -- snapshots, fork, the files-only pause ------------------------------------------------

    def footprint(self, entry_id: str, handle: Handle | None, keep_memory: bool) -> int:
        sandbox = self._sandbox(entry_id, running=False)
        size = len(json.dumps(sandbox.files))
        if keep_memory and self.persistence.memory_in_snapshots:
            size += len(json.dumps(sandbox.memory))
        return size

    def snapshot(
        self, entry_id: str, handle: Handle | None, directory: Path, keep_memory: bool
    ) -> SnapshotArtifact:
        self._record("snapshot", entry_id)
        sandbox = self._sandbox(entry_id)
        (directory / "files.json").write_text(json.dumps(sandbox.files))
        with self._lock:
            if self.failing_snapshots > 0:
                self.failing_snapshots -= 1
                raise SubstrateError(f"fake snapshot of {entry_id} failed (as asked)")
        kept_memory = keep_memory and self.persistence.memory_in_snapshots
        if kept_memory:
            (directory / "memory.json").write_text(json.dumps(sandbox.memory))
        size = sum(f.stat().st_size for f in directory.iterdir())
        return SnapshotArtifact(directory, kept_memory, size, {"source": entry_id})

    def spawn_from_snapshot(self, spec: SpawnSpec, artifact: SnapshotArtifact) -> Handle:
        self._record("spawn_from_snapshot", spec.entry_id)
        files = json.loads((artifact.directory / "files.json").read_text())
        memory = (
            json.loads((artifact.directory / "memory.json").read_text())
            if artifact.kept_memory
            else {}
        )
        with self._lock:
            if self.failing_spawns > 0:
                self.failing_spawns -= 1
                raise SubstrateError(f"fake spawn of {spec.entry_id} failed (as asked)")
            self.sandboxes[spec.entry_id] = FakeSandbox(spec.ip, files=files, memory=memory)
        return Handle(head=None, detail="fake", driver={"ip": spec.ip})

    def stop_processes(self, entry_id: str, handle: Handle | None) -> None:
        self._record("stop_processes", entry_id)
        sandbox = self._sandbox(entry_id, running=False)
        sandbox.alive, sandbox.paused, sandbox.memory = False, False, {}

    def start_processes(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        self._record("start_processes", spec.entry_id)
        sandbox = self._sandbox(spec.entry_id, running=False)
        if not sandbox.files_on_disk:
            raise SandboxDied(spec.entry_id, "its kept files are gone")
        with self._lock:
            if self.failing_starts > 0:
                self.failing_starts -= 1
                raise SubstrateError(f"fake start of {spec.entry_id} failed (as asked)")
            sandbox.alive, sandbox.paused, sandbox.memory = True, False, {}
            sandbox.boots += 1
        return Handle(head=None, detail="fake", driver={"ip": spec.ip, "boots": sandbox.boots})

    def has_files(self, entry_id: str, handle: Handle | None) -> bool:
        with self._lock:
            found = self.sandboxes.get(entry_id)
        return found is not None and found.files_on_disk

    def end_capture(self, entry_id: str, handle: Handle | None) -> None:
        self._record("end_capture", entry_id)
        self._sandbox(entry_id).paused = False

    def delete_snapshot(self, directory: Path) -> None:
        self._record("delete_snapshot", directory.name)
        shutil.rmtree(directory, ignore_errors=True)

    # -- what tests do to it ------------------------------------------------------------------

    def reboot(self) -> None:
        """The host restarts: every process ends and frozen memory is lost, unless this
        substrate keeps a memory pause on disk; files stay."""
        with self._lock:
            for sandbox in self.sandboxes.values():
                if sandbox.paused and self.persistence.memory_pause_survives_reboot:
                    continue
                sandbox.alive, sandbox.paused, sandbox.memory = False, False, {}

    def lose_files(self, entry_id: str) -> None:
        with self._lock:
            self.sandboxes[entry_id].files_on_disk = False

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
