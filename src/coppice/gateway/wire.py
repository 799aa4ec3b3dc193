"""E2B's control-plane JSON: request bodies in, response bodies out (wire spec §1.3 to §1.5).

Parsing is strict about types (a wrong type is a 400 that names the field) and lenient about
unknown keys, as E2B's own API is.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from coppice.config import Limits
from coppice.errors import InvalidRequest
from coppice.store.records import HandedOut, TemplateRecord

#: the envd protocol level the agent implements; the SDK turns features on by it (§1.4)
ENVD_VERSION = "0.5.7"
CLIENT_ID = "coppice"


@dataclass(frozen=True)
class CreateRequest:
    template_id: str
    timeout_s: int
    metadata: dict[str, str]
    env_vars: dict[str, str]
    on_timeout: str
    auto_resume: bool


def _object(body: Any, where: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{where} must be a JSON object")
    return body


def _string_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidRequest(f"{name} must be an object of string to string")
    return dict(value)


def timeout_value(value: Any, name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number of seconds")
    seconds = int(value)
    if not 0 < seconds <= maximum:
        raise InvalidRequest(f"{name} must be between 1 and {maximum} seconds, not {seconds}")
    return seconds


def _enabled(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    obj = _object(value, name)
    enabled = obj.get("enabled", False)
    if not isinstance(enabled, bool):
        raise InvalidRequest(f"{name}.enabled must be true or false")
    return enabled


def parse_create(body: Any, default_timeout: int, max_timeout: int) -> CreateRequest:
    obj = _object(body, "the request body")
    template_id = obj.get("templateID")
    if not isinstance(template_id, str) or not template_id:
        raise InvalidRequest("templateID is required and must be a non-empty string")
    timeout = obj.get("timeout")
    auto_pause = _enabled(obj.get("autoPause"), "autoPause")
    return CreateRequest(
        template_id=template_id,
        timeout_s=default_timeout
        if timeout is None
        else timeout_value(timeout, "timeout", max_timeout),
        metadata=_string_map(obj.get("metadata"), "metadata"),
        env_vars=_string_map(obj.get("envVars"), "envVars"),
        on_timeout="pause" if auto_pause else "kill",
        auto_resume=_enabled(obj.get("autoResume"), "autoResume"),
    )


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def state_of(h: HandedOut) -> str:
    return "paused" if h.entry.state.value == "paused" else "running"


def sandbox_json(h: HandedOut, template: str) -> dict[str, Any]:
    """The `Sandbox` model: create, connect and resume answer with it."""
    return {
        "sandboxID": h.sandbox.id,
        "templateID": h.sandbox.template_id,
        "clientID": CLIENT_ID,
        "alias": template,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": h.sandbox.access_token,
        "trafficAccessToken": None,
        "domain": None,
    }


def listed_json(h: HandedOut, template: str, limits: Limits) -> dict[str, Any]:
    return {
        "sandboxID": h.sandbox.id,
        "templateID": h.sandbox.template_id,
        "clientID": CLIENT_ID,
        "alias": template,
        "startedAt": iso(h.sandbox.started_at),
        "endAt": iso(h.sandbox.end_at),
        "cpuCount": max(1, round(limits.cpus)),
        "memoryMB": limits.memory_mb,
        "diskSizeMB": limits.disk_mb,
        "state": state_of(h),
        "envdVersion": ENVD_VERSION,
        "metadata": h.sandbox.metadata,
    }


def detail_json(h: HandedOut, template: str, limits: Limits) -> dict[str, Any]:
    return {
        **listed_json(h, template, limits),
        "envdAccessToken": h.sandbox.access_token,
        "domain": None,
        "lifecycle": {"autoResume": h.sandbox.auto_resume, "onTimeout": h.sandbox.on_timeout},
    }


def template_json(t: TemplateRecord, aliases: tuple[str, ...], limits: Limits) -> dict[str, Any]:
    return {
        "templateID": t.name,
        "buildID": t.recipe_hash[:12],
        "aliases": list(aliases),
        "names": [t.name, *aliases],
        "cpuCount": max(1, round(limits.cpus)),
        "memoryMB": limits.memory_mb,
        "diskSizeMB": limits.disk_mb,
        "public": True,
        "createdAt": iso(t.built_at),
        "updatedAt": iso(t.built_at),
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": 1,
        "buildStatus": "ready",
        "envdVersion": ENVD_VERSION,
        "createdBy": None,
        "substrate": t.substrate,
    }


@dataclass(frozen=True)
class ListQuery:
    metadata: dict[str, str]
    states: frozenset[str]
    limit: int
    after: tuple[float, str] | None  # (started_at, id) of the last item of the previous page
    newest_first: bool = False


def parse_list_query(params: dict[str, str], max_limit: int = 1000) -> ListQuery:
    metadata: dict[str, str] = {}
    if params.get("metadata"):
        # The SDK percent-quotes each key and value and joins them as a form string.
        metadata = dict(parse_qsl(params["metadata"], keep_blank_values=True))
    states = frozenset(s for s in params.get("state", "").split(",") if s)
    unknown = states - {"running", "paused"}
    if unknown:
        raise InvalidRequest(f"state must be running and/or paused, not {sorted(unknown)}")
    raw_limit = params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= max_limit:
        raise InvalidRequest(f"limit must be a whole number between 1 and {max_limit}")
    after = None
    if params.get("nextToken"):
        after = decode_token(params["nextToken"])
    order = params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be asc or desc, not {order!r}")
    return ListQuery(metadata, states, int(raw_limit), after, newest_first=order == "desc")


def encode_token(started_at: float, sandbox_id: str) -> str:
    return base64.urlsafe_b64encode(f"{started_at!r}|{sandbox_id}".encode()).decode()


def decode_token(token: str) -> tuple[float, str]:
    try:
        started, _, sandbox_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return float(started), sandbox_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("nextToken is not a token this gateway handed out") from None
