"""The E2B template build API's JSON: build requests, tag requests and log queries in;
build status, log entries and tags out. Unknown request fields are refused (a field Coppice
does not act on would otherwise change nothing while the caller believes it did)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coppice.config import Limits
from coppice.errors import InvalidRequest
from coppice.gateway.catalog import DEFAULT_TAG, split_ref
from coppice.gateway.sandbox_logs import LEVELS
from coppice.gateway.wire import iso
from coppice.store.records import BuildLogEntry, TemplateBuildRecord, TemplateTagRecord

#: a template's name is its id here, and the first part of its sandboxes' host names
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: E2B's bounds (CPUCount, MemoryMB), and what one host can mean
MAX_CPUS = 64
MIN_MEMORY_MB = 128
MAX_MEMORY_MB = 1 << 20
#: log lines one status call returns at most (E2B's limit)
MAX_LOG_ENTRIES = 100


def check_template_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidRequest(
            f"template name {name!r} is not valid: 1-63 characters of a-z, 0-9, '.', '_' "
            "and '-', starting with a letter or digit (a tag follows a ':')"
        )
    return name


def check_tags(tags: Any, where: str = "tags") -> tuple[str, ...]:
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidRequest(f"{where} must be a list of strings")
    for tag in tags:
        if not _TAG.match(tag):
            raise InvalidRequest(
                f"tag {tag!r} is not valid: 1-128 characters of letters, digits, '.', '_' "
                "and '-', starting with a letter or digit"
            )
    return tuple(dict.fromkeys(tags))


def _object(body: Any, known: set[str], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"the body of {what} must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)} in {what}")
    return body


def _whole(value: Any, name: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a whole number between {low} and {high}")
    return value


# -- POST /v3/templates -----------------------------------------------------------------------


@dataclass(frozen=True)
class BuildRequest:
    name: str
    tags: tuple[str, ...]
    cpu_count: int | None = None
    memory_mb: int | None = None
    #: E2B's "free disk after the steps"; here the floor of the template's disk size
    min_free_disk_mb: int | None = None

    def limits(self, defaults: Limits) -> Limits:
        """What the template's sandboxes get: what was asked for, else the host's defaults."""
        return Limits(
            memory_mb=self.memory_mb if self.memory_mb is not None else defaults.memory_mb,
            pids=defaults.pids,
            cpus=float(self.cpu_count) if self.cpu_count is not None else defaults.cpus,
            disk_mb=max(defaults.disk_mb, self.min_free_disk_mb or 0),
        )


def parse_build_request(body: Any) -> BuildRequest:
    """`TemplateBuildRequestV3`; `name` may be `name:tag`, the tag joining `tags`. Without
    any tag the build takes E2B's default one."""
    obj = _object(
        body, {"name", "alias", "tags", "cpuCount", "memoryMB", "minFreeDiskMb"}, "a build request"
    )
    ref = obj.get("name") if obj.get("name") is not None else obj.get("alias")
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest("name is required: the template's name, optionally name:tag")
    name, tag = split_ref(ref)
    check_template_name(name)
    tags = check_tags(([tag] if tag is not None else []) + list(_list(obj.get("tags"))))
    return BuildRequest(
        name=name,
        tags=tags or (DEFAULT_TAG,),
        cpu_count=_whole(obj.get("cpuCount"), "cpuCount", 1, MAX_CPUS),
        memory_mb=_whole(obj.get("memoryMB"), "memoryMB", MIN_MEMORY_MB, MAX_MEMORY_MB),
        min_free_disk_mb=_whole(obj.get("minFreeDiskMb"), "minFreeDiskMb", 0, MAX_MEMORY_MB * 16),
    )


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest("tags must be a list of strings")
    return value


def build_requested_json(build: TemplateBuildRecord, aliases: Sequence[str]) -> dict[str, Any]:
    """`TemplateRequestResponseV3`: the template's id is its name."""
    return {
        "templateID": build.template,
        "buildID": build.id,
        "public": True,
        "names": [build.template, *aliases],
        "tags": list(build.tags),
        "aliases": list(aliases),
    }


# -- tags -------------------------------------------------------------------------------------


def parse_assign_tags(body: Any) -> tuple[str, str | None, tuple[str, ...]]:
    """`AssignTemplateTagsRequest`: (template, the tag naming the source build, new tags)."""
    obj = _object(body, {"target", "tags"}, "a tag assignment")
    target = obj.get("target")
    if not isinstance(target, str) or not target:
        raise InvalidRequest("target is required: the build to tag, as name:tag")
    name, tag = split_ref(target)
    tags = check_tags(obj.get("tags"))
    if not tags:
        raise InvalidRequest("tags must name at least one tag")
    return name, tag, tags


def parse_delete_tags(body: Any) -> tuple[str, tuple[str, ...]]:
    """`DeleteTemplateTagsRequest`: (template, tags to remove)."""
    obj = _object(body, {"name", "tags"}, "a tag removal")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("name is required: the template whose tags go")
    tags = check_tags(obj.get("tags"))
    if not tags:
        raise InvalidRequest("tags must name at least one tag")
    return split_ref(name)[0], tags


def assigned_tags_json(build_id: str, tags: Sequence[str]) -> dict[str, Any]:
    return {"buildID": build_id, "tags": list(tags)}


def tags_json(tags: Sequence[TemplateTagRecord]) -> list[dict[str, Any]]:
    return [{"tag": t.tag, "buildID": t.build_id, "createdAt": iso(t.created_at)} for t in tags]


# -- status and logs --------------------------------------------------------------------------


def levels_from(level: str | None) -> tuple[str, ...] | None:
    """The levels a `level` filter keeps: that one and the more severe."""
    if level is None:
        return None
    if level not in LEVELS:
        raise InvalidRequest(f"level must be one of {list(LEVELS)}, not {level!r}")
    return LEVELS[LEVELS.index(level) :]


def _count(params: Mapping[str, str], name: str, default: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) > high:
        raise InvalidRequest(f"{name} must be a whole number between 0 and {high}")
    return int(raw)


@dataclass(frozen=True)
class StatusQuery:
    offset: int = 0
    limit: int = MAX_LOG_ENTRIES
    levels: tuple[str, ...] | None = None


def parse_status_query(params: Mapping[str, str]) -> StatusQuery:
    unknown = sorted(set(params) - {"logsOffset", "limit", "level"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s) {unknown}; take logsOffset, limit, level")
    return StatusQuery(
        offset=_count(params, "logsOffset", 0, 1 << 31),
        limit=_count(params, "limit", MAX_LOG_ENTRIES, MAX_LOG_ENTRIES),
        levels=levels_from(params.get("level") or None),
    )


@dataclass(frozen=True)
class BuildLogsQuery:
    cursor_ms: int | None = None
    limit: int = MAX_LOG_ENTRIES
    forward: bool = True
    levels: tuple[str, ...] | None = None


def parse_build_logs_query(params: Mapping[str, str]) -> BuildLogsQuery:
    known = {"cursor", "limit", "direction", "level", "source"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter(s) {unknown}; build logs take {sorted(known)}"
        )
    cursor = params.get("cursor")
    if cursor is not None and not cursor.isdigit():
        raise InvalidRequest("cursor must be a Unix time in milliseconds")
    direction = params.get("direction", "forward")
    if direction not in ("forward", "backward"):
        raise InvalidRequest(f"direction must be forward or backward, not {direction!r}")
    # Every build log here is kept for good: both sources are the same lines.
    if params.get("source", "persistent") not in ("persistent", "temporary"):
        raise InvalidRequest("source must be persistent or temporary")
    return BuildLogsQuery(
        cursor_ms=int(cursor) if cursor is not None else None,
        limit=_count(params, "limit", MAX_LOG_ENTRIES, MAX_LOG_ENTRIES),
        forward=direction == "forward",
        levels=levels_from(params.get("level") or None),
    )


def log_entry_json(entry: BuildLogEntry) -> dict[str, Any]:
    body: dict[str, Any] = {
        "timestamp": iso(entry.timestamp),
        "level": entry.level,
        "message": entry.message,
    }
    if entry.step is not None:
        body["step"] = entry.step
    return body


def build_status_json(
    build: TemplateBuildRecord, entries: Sequence[BuildLogEntry]
) -> dict[str, Any]:
    """`TemplateBuildInfo`: the status, the log lines asked for, and why it failed."""
    body: dict[str, Any] = {
        "templateID": build.template,
        "buildID": build.id,
        "status": build.status,
        "logs": [e.message for e in entries],
        "logEntries": [log_entry_json(e) for e in entries],
    }
    if build.status == "error" and build.failure is not None:
        reason: dict[str, Any] = {
            "message": build.failure.message,
            "logEntries": [log_entry_json(e) for e in build.failure.log_tail],
        }
        if build.failure.step is not None:
            reason["step"] = build.failure.step
        body["reason"] = reason
    return body


def build_logs_json(entries: Sequence[BuildLogEntry]) -> dict[str, Any]:
    """`TemplateBuildLogsResponse`."""
    return {"logs": [log_entry_json(e) for e in entries]}
