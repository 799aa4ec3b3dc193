"""Plain records the store hands out; they carry data, not behaviour."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coppice.config import Limits
from coppice.egress_policy import EgressPolicy
from coppice.host.processes import ProcessIdentity
from coppice.lifecycle import State


@dataclass(frozen=True)
class TemplatePolicy:
    """How a template's sandboxes run, fixed when the template is built (not looked up by
    its name later): its limits (None: the host's defaults), the other names callers may use
    for it, and whether the gateway may start one on demand when the pool is empty."""

    limits: Limits | None = None
    aliases: tuple[str, ...] = ()
    cold_start: bool = True
    #: warm entries the gateway keeps of it when `pool_targets` does not say; None: none
    pool_target: int | None = None
    #: how long a warm waits for it to answer; None: the host's `ready_timeout_s` (a start
    #: command's ready check can take longer than an agent's start-up)
    ready_timeout_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "limits": None if self.limits is None else dataclasses.asdict(self.limits),
            "aliases": list(self.aliases),
            "cold_start": self.cold_start,
            "pool_target": self.pool_target,
            "ready_timeout_s": self.ready_timeout_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TemplatePolicy:
        limits = data.get("limits")
        return cls(
            limits=None if limits is None else Limits(**limits),
            aliases=tuple(data.get("aliases") or ()),
            cold_start=bool(data.get("cold_start", True)),
            pool_target=data.get("pool_target"),
            ready_timeout_s=data.get("ready_timeout_s"),
        )


@dataclass(frozen=True)
class TemplateRecord:
    name: str
    substrate: str
    recipe_hash: str
    rootfs: str
    built_at: float
    build_seconds: float
    size_bytes: int
    #: templates built before policies were stored read as the defaults until rebuilt
    policy: TemplatePolicy = TemplatePolicy()

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TemplateRecord:
        data = {k: row[k] for k in row.keys()}  # noqa: SIM118 - Row has no iterator of keys
        raw = data.pop("policy", None)
        policy = TemplatePolicy.from_json(json.loads(raw)) if raw else TemplatePolicy()
        return cls(**data, policy=policy)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "substrate": self.substrate,
            "recipe_hash": self.recipe_hash,
            "rootfs": self.rootfs,
            "built_at": self.built_at,
            "build_seconds": self.build_seconds,
            "size_bytes": self.size_bytes,
            "policy": self.policy.to_json(),
        }

    def row(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.substrate,
            self.recipe_hash,
            self.rootfs,
            self.built_at,
            self.build_seconds,
            self.size_bytes,
            json.dumps(self.policy.to_json()),
        )


@dataclass(frozen=True)
class HeadProcess:
    """The host process whose life is the sandbox's: pid plus start time, so that any later
    process can tell it from a reused pid."""

    pid: int
    start_time: int

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.start_time)


@dataclass(frozen=True)
class Handle:
    """What a substrate hands back for a sandbox it started, stored with the entry: the part
    every driver has (its head process; a short `detail` for listings, such as a VM's
    accelerator) and the driver's own part, which only that driver reads."""

    head: HeadProcess | None
    detail: str = ""
    driver: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        head = None if self.head is None else {"pid": self.head.pid, "start": self.head.start_time}
        return {"head": head, "detail": self.detail, "driver": self.driver}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Handle:
        if "driver" not in data:
            return cls._from_flat(data)
        head = data.get("head")
        return cls(
            head=None if head is None else HeadProcess(int(head["pid"]), int(head["start"])),
            detail=str(data.get("detail") or ""),
            driver=dict(data["driver"]),
        )

    @classmethod
    def _from_flat(cls, data: dict[str, Any]) -> Handle:
        """Handles written before they were typed: one flat object (entries that survive an
        upgrade, reconciled or torn down by the new code)."""
        own = {k: v for k, v in data.items() if k not in ("pid", "pid_start")}
        pid, start = data.get("pid"), data.get("pid_start")
        head = None if pid is None or start is None else HeadProcess(int(pid), int(start))
        return cls(head=head, detail=str(data.get("accel") or ""), driver=own)


@dataclass(frozen=True)
class SnapshotArtifact:
    """What a snapshot kept, where, and how much disk it takes; stored with the snapshot so
    any later process can start sandboxes from it or delete it."""

    directory: Path
    #: memory and processes were kept beside the files (sandboxes from it resume, not boot)
    kept_memory: bool
    size_bytes: int
    #: the driver's own part (file names inside `directory`, a memory file's format)
    driver: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "kept_memory": self.kept_memory,
            "size_bytes": self.size_bytes,
            "driver": self.driver,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SnapshotArtifact:
        return cls(
            Path(data["directory"]),
            bool(data["kept_memory"]),
            int(data["size_bytes"]),
            dict(data.get("driver") or {}),
        )


@dataclass(frozen=True)
class EntryRecord:
    id: str
    template: str
    substrate: str
    state: State
    ip: str
    hostname: str
    handle: Handle | None
    owner_pid: int | None
    owner_start: int | None
    deadline: float | None
    created_at: float
    updated_at: float
    ready_at: float | None
    checked_out_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EntryRecord:
        return cls.from_mapping({k: row[k] for k in row.keys()})  # noqa: SIM118

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> EntryRecord:
        data = dict(data)
        data["state"] = State(data["state"])
        data["handle"] = Handle.from_json(json.loads(data["handle"])) if data["handle"] else None
        return cls(**data)

    @property
    def pid(self) -> int | None:
        """The head process's pid, if it has one (for listings and `coppice ssh`)."""
        head = self.handle.head if self.handle is not None else None
        return head.pid if head is not None else None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "template": self.template,
            "substrate": self.substrate,
            "state": self.state.value,
            "ip": self.ip,
            "hostname": self.hostname,
            "pid": self.pid,
            "detail": self.handle.detail if self.handle is not None else "",
            "created_at": self.created_at,
            "ready_at": self.ready_at,
            "checked_out_at": self.checked_out_at,
        }


ENTRY_COLUMNS = (
    "id",
    "template",
    "substrate",
    "state",
    "ip",
    "hostname",
    "handle",
    "owner_pid",
    "owner_start",
    "deadline",
    "created_at",
    "updated_at",
    "ready_at",
    "checked_out_at",
)


@dataclass(frozen=True)
class SandboxRecord:
    """What the gateway promised about a handed-out entry (same id as the entry)."""

    id: str
    template_id: str  # as the caller named it (an alias like "base" stays "base")
    tenant: str
    access_token: str
    env_vars: dict[str, str]
    metadata: dict[str, str]
    started_at: float
    end_at: float
    timeout_s: float
    on_timeout: str  # "kill", "pause" (memory kept) or "pause_files" (files only)
    auto_resume: bool
    idempotency_key: str | None
    #: set when the sandbox's own ports are private: requests to them must carry it
    traffic_token: str | None = None
    #: what it may reach beyond the host; None: the host's default
    egress: EgressPolicy | None = None
    #: disk its kept files hold while it is paused with files only (0 otherwise), counted
    #: against the snapshot disk budget
    kept_bytes: int = 0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SandboxRecord:
        return cls.from_mapping({k: row[k] for k in SANDBOX_COLUMNS})

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> SandboxRecord:
        data = dict(data)
        data["env_vars"] = json.loads(data["env_vars"])
        data["metadata"] = json.loads(data["metadata"])
        data["auto_resume"] = bool(data["auto_resume"])
        egress = data.get("egress")
        data["egress"] = EgressPolicy.from_json(egress) if egress else None
        return cls(**data)

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.template_id,
            self.tenant,
            self.access_token,
            json.dumps(self.env_vars),
            json.dumps(self.metadata),
            self.started_at,
            self.end_at,
            self.timeout_s,
            self.on_timeout,
            int(self.auto_resume),
            self.idempotency_key,
            self.traffic_token,
            self.egress.to_json() if self.egress is not None else None,
            self.kept_bytes,
        )


SANDBOX_COLUMNS = (
    "id",
    "template_id",
    "tenant",
    "access_token",
    "env_vars",
    "metadata",
    "started_at",
    "end_at",
    "timeout_s",
    "on_timeout",
    "auto_resume",
    "idempotency_key",
    "traffic_token",
    "egress",
    "kept_bytes",
)


@dataclass(frozen=True)
class HandedOut:
    """A sandbox with the entry that runs it."""

    sandbox: SandboxRecord
    entry: EntryRecord


@dataclass(frozen=True)
class PoolTargetRecord:
    """A pool's target as the gateway last decided it: `why` says what set it (base, rate,
    burst, or the cap that held it below `wanted`); `waiting`: creates waiting then."""

    template: str
    target: int
    why: str
    wanted: int
    waiting: int
    decided_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> PoolTargetRecord:
        return cls(
            row["template"],
            row["target"],
            row["why"],
            row["wanted"],
            row["waiting"],
            row["decided_at"],
        )


@dataclass(frozen=True)
class TombstoneRecord:
    """A sandbox that died (not one killed by its user or its timeout): who had it, when it
    died, why (`reason` a word, `detail` a sentence) and the last lines of its console. The
    access token lets its in-sandbox traffic be told why too, and nobody else."""

    id: str
    tenant: str
    template: str
    access_token: str
    died_at: float
    reason: str
    detail: str
    log_tail: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TombstoneRecord:
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            template=row["template"],
            access_token=row["access_token"],
            died_at=row["died_at"],
            reason=row["reason"],
            detail=row["detail"],
            log_tail=tuple(json.loads(row["log_tail"])),
        )

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.tenant,
            self.template,
            self.access_token,
            self.died_at,
            self.reason,
            self.detail,
            json.dumps(list(self.log_tail)),
        )


#: a template build's states, E2B's names: requested (and queued), running, done, failed
BUILD_STATUSES = ("waiting", "building", "ready", "error")


@dataclass(frozen=True)
class BuildLogEntry:
    """One line of a build's log."""

    timestamp: float
    level: str  # debug, info, warn or error
    message: str
    #: E2B's step the line belongs to: "base", "1", "2", ..., "finalize"; None: the build's own
    step: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": self.timestamp,
            "level": self.level,
            "message": self.message,
            "step": self.step,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildLogEntry:
        return cls(float(data["ts"]), str(data["level"]), str(data["message"]), data.get("step"))


@dataclass(frozen=True)
class BuildFailure:
    """Why a build ended in error: the message the SDK raises, the failing step, its tail."""

    message: str
    step: str | None = None
    log_tail: tuple[BuildLogEntry, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "step": self.step,
            "log_tail": [e.to_json() for e in self.log_tail],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildFailure:
        tail = tuple(BuildLogEntry.from_json(e) for e in data.get("log_tail") or ())
        return cls(str(data["message"]), data.get("step"), tail)


@dataclass(frozen=True)
class TemplateBuildRecord:
    """One build asked for through the build API. Its template's record (in `templates`)
    changes only when a build of it succeeds; `recipe_hash` then says which version it made."""

    id: str
    template: str
    status: str
    #: what the template's sandboxes get, as the build request asked
    limits: Limits
    #: tags the build takes when it succeeds
    tags: tuple[str, ...]
    created_at: float
    updated_at: float
    #: when the build was started (POST of its steps); None: not asked to start yet
    started_at: float | None = None
    finished_at: float | None = None
    recipe_hash: str | None = None
    failure: BuildFailure | None = None

    @property
    def triggered(self) -> bool:
        return self.started_at is not None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TemplateBuildRecord:
        failure = json.loads(row["failure"]) if row["failure"] else None
        return cls(
            id=row["id"],
            template=row["template"],
            status=row["status"],
            limits=Limits(**json.loads(row["limits"])),
            tags=tuple(json.loads(row["tags"])),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            recipe_hash=row["recipe_hash"],
            failure=None if failure is None else BuildFailure.from_json(failure),
        )


@dataclass(frozen=True)
class TemplateTagRecord:
    """A tag names one build of a template (`name:tag`)."""

    template: str
    tag: str
    build_id: str
    created_at: float


#: what a snapshot keeps: files only, or files with memory and processes
SNAPSHOT_KINDS = ("files", "files+memory")


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot of a sandbox, or (purpose "fork") the passing capture a fork starts its
    sandboxes from. `state` is "making" from the moment its directory may exist until the
    capture is done, so that a crash in between leaves a row reconcile can find and remove
    with what it wrote; a fork's capture stays "making" until it is deleted, after its
    forks are up."""

    id: str
    #: the caller's name for it (unique per tenant; a newer snapshot takes it over); None
    name: str | None
    tenant: str
    source_id: str
    template: str
    substrate: str
    purpose: str  # "snapshot" or "fork"
    kind: str  # one of SNAPSHOT_KINDS: asked for while making, kept once ready
    size_bytes: int
    path: str
    state: str  # "making" or "ready"
    created_at: float
    owner_pid: int | None = None
    owner_start: int | None = None
    artifact: SnapshotArtifact | None = None

    @property
    def kept_memory(self) -> bool:
        return self.kind == "files+memory"

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SnapshotRecord:
        data = {k: row[k] for k in row.keys()}  # noqa: SIM118 - Row has no iterator of keys
        raw = data.pop("artifact", None)
        artifact = SnapshotArtifact.from_json(json.loads(raw)) if raw else None
        return cls(**data, artifact=artifact)
