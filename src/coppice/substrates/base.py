"""What every isolation substrate provides. Drivers do the I/O; the pool decides.

A driver is one module implementing `Substrate` plus one line in `registry.DRIVERS`. What
several drivers need alike (their children table, the teardown collector, the prerequisite
checks) lives in `children.py`, `teardown.py` and `prerequisites.py`, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coppice.config import Limits, NetworkSettings
from coppice.egress_policy import EgressPolicy
from coppice.resource_usage import ResourceUsage
from coppice.store.records import Handle, HeadProcess, SnapshotArtifact, TemplateRecord

__all__ = [
    "AGENT_PORT",
    "SSH_PORT",
    "EgressControl",
    "Handle",
    "HeadProcess",
    "HostObjects",
    "Persistence",
    "SnapshotArtifact",
    "SpawnSpec",
    "Substrate",
]

#: where the in-sandbox agent listens (the port E2B's envd uses)
AGENT_PORT = 49983
SSH_PORT = 22


@dataclass(frozen=True)
class SpawnSpec:
    entry_id: str
    template: TemplateRecord
    ip: str
    hostname: str
    limits: Limits


@dataclass(frozen=True)
class HostObjects:
    """Entry ids that own something on the host, by kind of object (for leak detection)."""

    by_kind: dict[str, set[str]]

    def all_ids(self) -> set[str]:
        return set().union(*self.by_kind.values()) if self.by_kind else set()


@dataclass(frozen=True)
class Persistence:
    """What a substrate can keep of a sandbox beyond its running processes. The control
    plane reads it to promise no more than the driver does: a snapshot asked to keep memory
    where `memory_in_snapshots` is false is refused, and a memory pause where
    `memory_pause_survives_reboot` is false is answered as one a host reboot turns into a
    files-only pause."""

    #: a snapshot (and so a fork) carries the sandbox's memory and processes, not only files
    memory_in_snapshots: bool
    #: a pause that keeps memory (`pause`) is on disk and outlives a host reboot, rather than
    #: a freeze of processes that the reboot ends
    memory_pause_survives_reboot: bool
    #: the driver can stop the processes and keep the files (`stop_processes`); where not,
    #: such a pause is refused before anything changes
    files_only_pause: bool = True


class EgressControl(Protocol):
    """What a driver's sandboxes may reach beyond the host, by sandbox address."""

    @property
    def internet_by_default(self) -> bool:
        """The verdict for a sandbox without rules of its own."""

    def set(self, ip: str, policy: EgressPolicy | None) -> None:
        """Replace the sandbox's rules (None: back to the host's default)."""

    def pin(self, ip: str, addresses: Iterable[str]) -> None:
        """Let the sandbox reach `addresses`, answered for one of its allowed domains."""

    def reset(self, policies: Mapping[str, EgressPolicy]) -> None:
        """Hold exactly these rules, all others gone (a restart's view of the store)."""


class Substrate(Protocol):
    name: str

    @property
    def egress(self) -> EgressControl:
        """The host's firewall for this driver's sandboxes."""

    @property
    def network(self) -> NetworkSettings:
        """The address range this driver's entries draw from."""

    @property
    def spawn_parallelism(self) -> int:
        """How many entries this driver may bring up at once on this host."""

    def check_prerequisites(self) -> None:
        """Raise PrerequisiteMissing naming the fix when the host cannot run this substrate."""

    def prepare_host(self) -> None:
        """Idempotent host set-up: bridge, cgroup parents, directories."""

    def teardown_host(self) -> None:
        """Undo prepare_host; only called when no entry of this substrate exists."""

    def spawn(self, spec: SpawnSpec) -> Handle:
        """Start the sandbox; returns once its processes exist (not necessarily answering)."""

    def wait_ready(self, spec: SpawnSpec, handle: Handle, timeout_s: float) -> None:
        """Block until the sandbox answers on SSH and its agent, or raise SandboxNotReady."""

    def pause(self, entry_id: str, handle: Handle | None) -> None: ...

    def resume(self, entry_id: str, handle: Handle | None) -> None: ...

    def suspend(self, entry_id: str, handle: Handle | None) -> Handle:
        """A user's pause with memory and processes kept: a freeze where the driver cannot
        keep memory across a reboot, its memory written to disk (and its processes ended)
        where `persistence.memory_pause_survives_reboot`. Returns the handle it now has;
        `is_alive` stays true of it while what it kept is there."""

    def wake(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        """Undo `suspend`; returns the handle it now has once the sandbox runs (from disk: once
        it answers again)."""

    def is_alive(self, entry_id: str, handle: Handle | None) -> bool: ...

    def agent_address(self, handle: Handle) -> tuple[str, int]:
        """Where the gateway reaches the sandbox's agent (host and port): a local address
        here, a node's forwarded port for a remote driver."""

    def destroy(self, entry_id: str, handle: Handle | None) -> None:
        """Remove every host object of the entry; safe on half-built and already-gone ones."""

    def usage(self, entry_id: str, handle: Handle | None) -> ResourceUsage | None:
        """What the sandbox uses now (its cgroup, its disk); None where the driver cannot
        tell (the answer is then no metrics, not made-up ones)."""

    def console_log(self, entry_id: str) -> Path:
        """The file holding what the sandbox's init, agent and start command print (its
        logs, as the gateway serves them); it may not exist yet."""

    def forget_template(self, template_name: str) -> None:
        """The template was removed: drop what this driver keeps for it (a VM's golden
        snapshot); nothing for drivers that keep nothing."""

    def host_objects(self) -> HostObjects:
        """Which entry ids own processes, mounts, cgroups, links or directories right now."""

    # -- snapshots, fork, the files-only pause ----------------------------------------------
    #
    # A driver without these yet raises NotSupportedOnSubstrate from each (has_files answers
    # False), so the gateway refuses by name instead of pretending.

    @property
    def persistence(self) -> Persistence:
        """What this substrate keeps across a snapshot and across a host reboot."""

    def footprint(self, entry_id: str, handle: Handle | None, keep_memory: bool) -> int:
        """Bytes a snapshot of the sandbox (with its memory, if `keep_memory`) or a files-only
        pause of it would hold on disk now: checked against the disk budget before any work
        is done, so a capture that would not fit is refused before it starts."""

    def snapshot(
        self, entry_id: str, handle: Handle | None, directory: Path, keep_memory: bool
    ) -> SnapshotArtifact:
        """Capture the running sandbox's writable files (and, with `keep_memory` where
        `persistence.memory_in_snapshots`, its memory and devices) into `directory`, which
        the caller made empty. The sandbox may be paused for the capture but runs again when
        this returns, failed or not. The artifact must not depend on the sandbox: it outlives
        it. Raises SandboxDied if the sandbox is gone."""

    def spawn_from_snapshot(self, spec: SpawnSpec, artifact: SnapshotArtifact) -> Handle:
        """Start a new sandbox with `spec`'s identity (address, hostname, limits) from the
        artifact: its files, and its memory where the artifact kept it (then what ran goes on
        running, with the new identity applied as pool clones get theirs). Returns once its
        processes exist; the caller then waits with `wait_ready`. The new sandbox must not
        depend on the artifact afterwards (copy or reflink it): a snapshot can be deleted
        while its sandboxes run, and a fork's artifact is deleted once its forks are up."""

    def stop_processes(self, entry_id: str, handle: Handle | None) -> None:
        """End every process of the sandbox and keep its files (its writable layer, its
        disk) where they are, releasing its memory; the address stays reserved. What is kept
        must survive a gateway restart and a host reboot. Safe on a sandbox already stopped."""

    def start_processes(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        """Start the stopped sandbox's processes again on its kept files, as a fresh boot
        of the template's start-up on them; returns its new handle (a new head process)
        once they exist. The caller then waits with `wait_ready`."""

    def has_files(self, entry_id: str, handle: Handle | None) -> bool:
        """The sandbox's kept files are on disk (whether or not its processes run): what
        reconcile asks of a paused sandbox whose processes are gone before it keeps it."""

    def end_capture(self, entry_id: str, handle: Handle | None) -> None:
        """Release whatever `snapshot` holds on the sandbox while it captures (its processes
        frozen, its VM stopped) and let it run: after every capture, and by
        reconcile after a crash in the middle of one, when those holds are still on. Safe
        on a sandbox that holds none."""

    def delete_snapshot(self, directory: Path) -> None:
        """Remove what a snapshot holds on disk; safe on half-made and already-gone ones
        (reconcile removes what a crash in the middle of `snapshot` left)."""
