"""The one exception tree of Coppice.

Every failure a user can cause or meet is a `CoppiceError` with a message that names the fix.
The CLI (and later the gateway) translate these at a single boundary; nothing below them
prints or exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


class CoppiceError(Exception):
    """Base of every error Coppice raises on purpose."""

    #: process exit status the CLI uses for this kind of error
    exit_code = 1
    #: HTTP status the gateway will map this kind of error to
    http_status = 500
    #: E2B's machine-readable `error_code`, for the few errors the SDK tells apart by it
    error_code: str | None = None

    def extra_json(self) -> dict[str, Any]:
        """Fields the gateway's answer carries beside `code` and `message`."""
        return {}


class InvalidRequest(CoppiceError):
    """The caller asked for something malformed or out of range."""

    exit_code = 2
    http_status = 400


class NotSupportedYet(InvalidRequest):
    """The caller asked for an E2B feature Coppice does not implement (yet). Said out loud,
    because accepting the field and ignoring it would lie about what the sandbox does."""

    def __init__(self, feature: str, hint: str = "") -> None:
        tail = f"; {hint}" if hint else ""
        super().__init__(f"{feature} is not supported by Coppice yet{tail}")
        self.feature = feature


class NotSupportedOnSubstrate(NotSupportedYet):
    """A substrate's driver lacks an operation another substrate has (a snapshot of a jail
    before its mechanism exists): refused by name, never done halfway or faked."""

    def __init__(self, feature: str, substrate: str, hint: str = "") -> None:
        super().__init__(f"{feature} on the {substrate} substrate", hint)
        self.substrate = substrate


class Unauthorized(CoppiceError):
    """No API key, or one the gateway does not know."""

    http_status = 401


class Forbidden(CoppiceError):
    """A known API key without the scope the request needs."""

    http_status = 403


class NotFound(CoppiceError):
    http_status = 404


@dataclass(frozen=True)
class DeathNotice:
    """Why a sandbox that died is gone, as the errors about it tell its owner."""

    died_at: float
    reason: str
    detail: str
    log_tail: tuple[str, ...] = ()

    @property
    def died_at_iso(self) -> str:
        stamp = datetime.fromtimestamp(self.died_at, UTC).isoformat(timespec="seconds")
        return stamp.replace("+00:00", "Z")

    def sentence(self) -> str:
        return f"it died at {self.died_at_iso}: {self.detail}"

    def fields(self) -> dict[str, Any]:
        return {
            "state": "killed",
            "reason": self.reason,
            "diedAt": self.died_at_iso,
            "detail": self.detail,
            "logTail": list(self.log_tail),
        }


def _not_found_text(sandbox_id: str, died: DeathNotice | None) -> str:
    # The SDK recognises "was not found" in this text as "sandbox not running".
    tail = f": {died.sentence()}" if died is not None else ""
    return f"sandbox {sandbox_id} was not found{tail}"


class SandboxNotFound(NotFound):
    """No such sandbox (any more). `died`: it died rather than being killed or timing out,
    and its owner asks: the answer says when and why."""

    def __init__(self, sandbox_id: str, died: DeathNotice | None = None) -> None:
        super().__init__(_not_found_text(sandbox_id, died))
        self.sandbox_id = sandbox_id
        self.died = died

    def extra_json(self) -> dict[str, Any]:
        return self.died.fields() if self.died is not None else {}


class TemplateNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"template {name!r} is not built; run `coppice template build {name}` "
            "(`coppice template list` shows what is built)"
        )
        self.name = name


class UnknownRecipe(NotFound):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no recipe named {name!r}; known recipes: {', '.join(sorted(known))}")


class SnapshotNotFound(NotFound):
    def __init__(self, ref: str) -> None:
        super().__init__(
            f"snapshot {ref!r} was not found; Sandbox.list_snapshots() shows the snapshots "
            "there are"
        )
        self.ref = ref


class EntryNotFound(NotFound):
    def __init__(self, entry_id: str) -> None:
        super().__init__(
            f"no pool entry {entry_id!r}; `coppice pool list` shows the entries there are"
        )
        self.entry_id = entry_id


class Conflict(CoppiceError):
    """The request clashes with the current state (returning twice, removing a busy template)."""

    http_status = 409


class IllegalTransition(Conflict):
    def __init__(self, entry_id: str, state: str, event: str) -> None:
        super().__init__(f"entry {entry_id} is {state}; cannot {event} it")
        self.entry_id = entry_id
        self.state = state
        self.event = event


class PoolExhausted(CoppiceError):
    http_status = 429

    def __init__(self, template: str, retry_after_s: float = 1.0, why: str = "") -> None:
        super().__init__(
            f"no entry for template {template!r}: {why}; retry after {retry_after_s:.0f} s"
            if why
            else f"no available entry in pool {template!r}; "
            f"warm more with `coppice pool warm {template} --count N`"
        )
        self.template = template
        self.retry_after_s = retry_after_s


class CapacityExceeded(CoppiceError):
    """No more addresses (or other finite host resources) for new entries."""

    http_status = 429


class PrerequisiteMissing(CoppiceError):
    """The host lacks something Coppice needs; the message says how to get it."""

    exit_code = 3


class SubstrateError(CoppiceError):
    """A sandbox could not be started, paused, resumed or destroyed."""

    http_status = 502


class GuestUnresponsive(CoppiceError):
    """A strict pause found the sandbox's agent not answering; nothing was paused. Not 409:
    the SDK reads a 409 on pause as "already paused"."""

    http_status = 500
    error_code = "sandbox_snapshot_guest_agent_unresponsive"

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(
            f"sandbox {sandbox_id}'s agent does not answer, so it was not paused; "
            "pause without strict=True to freeze it anyway"
        )


class SandboxNotRunning(CoppiceError):
    """In-sandbox traffic for a sandbox that does not exist, or no longer runs. A 502 whose
    message says "was not found" is what the SDK reads as "sandbox not running"."""

    http_status = 502

    def __init__(self, sandbox_id: str, died: DeathNotice | None = None) -> None:
        super().__init__(_not_found_text(sandbox_id, died))
        self.sandbox_id = sandbox_id
        self.died = died

    def extra_json(self) -> dict[str, Any]:
        return self.died.fields() if self.died is not None else {}


class SandboxUnreachable(SubstrateError):
    """Connecting to the sandbox failed: it died, or nothing listens on that port. The SDK
    reads "port is not open" as a running sandbox whose port is closed."""

    def __init__(self, sandbox_id: str, port: int) -> None:
        super().__init__(f"sandbox {sandbox_id}: port {port} is not open")
        self.sandbox_id = sandbox_id
        self.port = port


class SandboxIsPaused(CoppiceError):
    http_status = 502

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id} is paused; connect() to it resumes it")


class SandboxDied(SubstrateError):
    def __init__(self, entry_id: str, detail: str = "") -> None:
        extra = f": {detail}" if detail else ""
        super().__init__(f"sandbox {entry_id} is no longer running{extra}")
        self.entry_id = entry_id


class SandboxNotReady(SubstrateError):
    """A sandbox started but did not answer its readiness probe in time."""


class TemplateBuildError(CoppiceError):
    """A build failed. `step` names the failing step as its label (`RUN make`), or as
    E2B's step number when it came from the build API; `log_tail` is what it printed last."""

    def __init__(
        self, message: str, step: str | None = None, log_tail: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.step = step
        self.log_tail = log_tail


class HostResourceExhausted(CoppiceError):
    """Disk or memory on the host ran out (ENOSPC, ENOMEM)."""

    http_status = 507


class DiskBudgetExceeded(CoppiceError):
    """Snapshots and paused sandboxes would hold more disk than the host's
    `snapshot_disk_mb` allows; the message names what to delete to make room."""

    http_status = 507
