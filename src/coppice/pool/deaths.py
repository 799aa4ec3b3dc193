"""Why a sandbox died, from what it left behind (no I/O here).

The order is the order of certainty: a sandbox older than the host's boot died with the
host, whatever else is (not) left; an OOM kill counted in its cgroup is why it ended even when
the kill's victim was its init; then its head's exit status; else nobody saw why.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass
from datetime import UTC, datetime

from coppice.substrates.post_mortem import Findings

MIB = 1024 * 1024
#: a memory limit this high is the host's "none" (cgroup v1 reads as PAGE_COUNTER_MAX)
NO_LIMIT = 1 << 60
#: how much of the console's last line a diagnosis quotes
LAST_LINE_CHARS = 200


class DeathReason(enum.StrEnum):
    OUT_OF_MEMORY = "out_of_memory"
    CRASHED = "crashed"
    HOST_RESTARTED = "host_restarted"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Diagnosis:
    reason: DeathReason
    #: one sentence for the user: what happened and what to do about it
    detail: str
    #: processes the OOM killer ended in the sandbox over its life (0: none, or not known)
    oom_kills: int = 0


def diagnose(
    findings: Findings, created_at: float, boot_time: float | None, memory_mb: int | None = None
) -> Diagnosis:
    """`created_at`: when the entry was made; `boot_time`: the host's (None: unknown);
    `memory_mb`: the sandbox's limit, for when its cgroup is gone and cannot say."""
    oom = findings.oom
    kills = oom.oom_kills if oom is not None else 0
    if boot_time is not None and created_at < boot_time:
        booted = _stamp(boot_time)
        return Diagnosis(
            DeathReason.HOST_RESTARTED,
            f"the host restarted (it booted at {booted}); no sandbox outlives its host's "
            "restart: create a new one",
        )
    if oom is not None and kills > 0:
        limit = oom.limit_bytes if 0 < oom.limit_bytes < NO_LIMIT else None
        limit_mb = limit // MIB if limit is not None else memory_mb
        at_limit = f" at its {limit_mb} MiB limit" if limit_mb else ""
        return Diagnosis(
            DeathReason.OUT_OF_MEMORY,
            f"out of memory: the kernel's OOM killer ended {_processes(kills)} of it{at_limit}"
            f" (usage reached the limit {oom.limit_hits} times); give the template more "
            "memory (memory_mb) or make the code use less",
            kills,
        )
    status = findings.exit_status
    if status is not None:
        return Diagnosis(DeathReason.CRASHED, f"{_how_it_ended(status)}{_hint(findings)}")
    return Diagnosis(
        DeathReason.UNKNOWN,
        f"its processes ended and no cause was seen (no OOM kill, no exit status){_hint(findings)}",
    )


def _processes(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def _signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def _how_it_ended(status: int) -> str:
    """A head's returncode: negative, the signal that killed it; above 128, what a shell or
    bwrap reports for a child the signal (status - 128) killed."""
    if status < 0:
        return f"its head process was killed by {_signal_name(-status)}"
    if 128 < status < 128 + 65:
        return f"its init ended with status {status}: killed by {_signal_name(status - 128)}"
    return f"its init exited with status {status}"


def _hint(findings: Findings) -> str:
    if not findings.console_tail:
        return ""
    last = findings.console_tail[-1]
    shown = last if len(last) <= LAST_LINE_CHARS else last[: LAST_LINE_CHARS - 1] + "…"
    return f"; the last line of its console: {shown!r}"


def _stamp(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
