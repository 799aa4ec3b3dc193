"""What every isolation substrate provides. Drivers do the I/O; the pool decides."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from coppice.config import Limits
from coppice.host.processes import ProcessIdentity
from coppice.store.records import TemplateRecord

#: where the in-sandbox agent listens (the port E2B's envd uses)
AGENT_PORT = 49983
SSH_PORT = 22

Handle = dict[str, Any]
"""Plain JSON data stored with the entry: enough for any later process to find and clean up
the sandbox (pids with their start times, paths, addresses)."""


def head_alive(child: subprocess.Popen[bytes] | None, handle: Handle | None) -> bool:
    """Is a sandbox's head process running? `child` is our own Popen when this process
    started it (exit seen without a /proc race); `handle` identifies it for any process."""
    if child is not None and child.poll() is not None:
        return False
    if not handle or handle.get("pid") is None or handle.get("pid_start") is None:
        return False
    return ProcessIdentity(int(handle["pid"]), int(handle["pid_start"])).is_running()


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


class Substrate(Protocol):
    name: str

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

    def pause(self, entry_id: str) -> None: ...

    def resume(self, entry_id: str) -> None: ...

    def is_alive(self, entry_id: str, handle: Handle | None) -> bool: ...

    def destroy(self, entry_id: str, handle: Handle | None) -> None:
        """Remove every host object of the entry; safe on half-built and already-gone ones."""

    def console_log(self, entry_id: str) -> Path:
        """The file holding what the sandbox's init, agent and start command print (its
        logs, as the gateway serves them); it may not exist yet."""

    def host_objects(self) -> HostObjects:
        """Which entry ids own processes, mounts, cgroups, links or directories right now."""
