"""A sandbox's log lines as E2B's `GET /v2/sandboxes/{id}/logs` serves them, read from the
console its substrate keeps (the agent's own lines, the init script's and the start
command's). Parsing and filtering are pure; the gateway only hands in the text.

The agent writes `coppice-agent <ISO time>Z <LEVEL> <logger>: <message>`. Other programs
write bare lines: they take the time of the line before them (or the sandbox's start), and a
level only when they begin with one (`WARNING: ...`, as uvicorn's do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from coppice.errors import InvalidRequest
from coppice.gateway.wire import iso

LEVELS = ("debug", "info", "warn", "error")
_RANK = {name: rank for rank, name in enumerate(LEVELS)}
_LEVEL_WORDS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARN": "warn",
    "WARNING": "warn",
    "ERROR": "error",
    "CRITICAL": "error",
    "FATAL": "error",
}
_AGENT_LINE = re.compile(
    r"^coppice-agent (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) "
    r"(?P<level>[A-Z]+) (?P<logger>[^:\s]+): (?P<message>.*)$"
)
_LEVEL_PREFIX = re.compile(r"^(?P<level>[A-Z]{4,8}):\s+(?P<message>.*)$")
#: the most a caller may ask for at once (E2B's limit)
MAX_LIMIT = 1000
#: how much of a console is read: a sandbox printing without end must not cost the gateway
#: its memory; the oldest lines beyond this are not served
MAX_CONSOLE_BYTES = 4 << 20


@dataclass(frozen=True)
class LogLine:
    timestamp: float
    level: str
    message: str
    fields: dict[str, str] = field(default_factory=dict)


def parse_console(text: str, started_at: float) -> list[LogLine]:
    lines: list[LogLine] = []
    last = started_at
    for raw in text.splitlines():
        if not raw.strip():
            continue
        agent = _AGENT_LINE.match(raw)
        if agent is not None:
            last = datetime.fromisoformat(agent["ts"].replace("Z", "+00:00")).timestamp()
            lines.append(
                LogLine(
                    last,
                    _LEVEL_WORDS.get(agent["level"], "info"),
                    agent["message"],
                    {"logger": agent["logger"], "source": "agent"},
                )
            )
            continue
        prefixed = _LEVEL_PREFIX.match(raw)
        if prefixed is not None and prefixed["level"] in _LEVEL_WORDS:
            level, message = _LEVEL_WORDS[prefixed["level"]], prefixed["message"]
        else:
            level, message = "info", raw
        lines.append(LogLine(last, level, message, {"source": "console"}))
    return lines


@dataclass(frozen=True)
class LogQuery:
    cursor_ms: int | None = None
    limit: int = MAX_LIMIT
    forward: bool = True
    level: str | None = None
    search: str | None = None


#: query parameters of `GET /v2/sandboxes/{id}/logs`
LOG_PARAMETERS = frozenset({"cursor", "limit", "direction", "level", "search"})


def parse_log_query(params: dict[str, str]) -> LogQuery:
    unknown = sorted(set(params) - LOG_PARAMETERS)
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter(s) {unknown}; logs take {sorted(LOG_PARAMETERS)}"
        )
    cursor = params.get("cursor")
    if cursor is not None and not cursor.isdigit():
        raise InvalidRequest("cursor must be a Unix time in milliseconds")
    raw_limit = params.get("limit", str(MAX_LIMIT))
    if not raw_limit.isdigit() or int(raw_limit) > MAX_LIMIT:
        raise InvalidRequest(f"limit must be a whole number between 0 and {MAX_LIMIT}")
    direction = params.get("direction", "forward")
    if direction not in ("forward", "backward"):
        raise InvalidRequest(f"direction must be forward or backward, not {direction!r}")
    level = params.get("level")
    if level is not None and level not in _RANK:
        raise InvalidRequest(f"level must be one of {list(LEVELS)}, not {level!r}")
    search = params.get("search")
    if search is not None and len(search) > 256:
        raise InvalidRequest("search is at most 256 characters")
    return LogQuery(
        cursor_ms=int(cursor) if cursor is not None else None,
        limit=int(raw_limit),
        forward=direction == "forward",
        level=level,
        search=search or None,
    )


def select(lines: list[LogLine], query: LogQuery) -> list[LogLine]:
    """Forward: from the cursor on, oldest first. Backward: up to the cursor, newest first."""

    def wanted(line: LogLine) -> bool:
        if query.level is not None and _RANK[line.level] < _RANK[query.level]:
            return False
        if query.search is not None and query.search not in line.message:
            return False
        if query.cursor_ms is None:
            return True
        at_ms = int(line.timestamp * 1000)
        return at_ms >= query.cursor_ms if query.forward else at_ms <= query.cursor_ms

    chosen = [line for line in lines if wanted(line)]
    if not query.forward:
        chosen.reverse()
    return chosen[: query.limit]


def logs_json(lines: list[LogLine]) -> dict[str, Any]:
    return {
        "logs": [
            {
                "timestamp": iso(line.timestamp),
                "level": line.level,
                "message": line.message,
                "fields": line.fields,
            }
            for line in lines
        ]
    }


def legacy_logs_json(lines: list[LogLine]) -> dict[str, Any]:
    """The deprecated v1 shape: plain lines beside the structured entries."""
    return {
        "logs": [{"timestamp": iso(line.timestamp), "line": line.message} for line in lines],
        "logEntries": logs_json(lines)["logs"],
    }
