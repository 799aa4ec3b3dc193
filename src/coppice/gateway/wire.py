"""E2B's control-plane JSON: request bodies in, response bodies out (wire spec §1.3 to §1.5).

Parsing is strict about types (a wrong type is a 400 that names the field) and lenient about
unknown keys, as E2B's own API is.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from coppice.config import Limits
from coppice.egress_policy import EgressPolicy
from coppice.errors import InvalidRequest, NotSupportedYet
from coppice.lifecycle import State
from coppice.store.records import HandedOut, TemplateBuildRecord, TemplateRecord
from coppice.substrates.base import Persistence

#: the envd protocol level the agent implements; the SDK turns features on by it (§1.4)
ENVD_VERSION = "0.6.4"
CLIENT_ID = "coppice"


@dataclass(frozen=True)
class CreateRequest:
    template_id: str
    timeout_s: int
    metadata: dict[str, str]
    env_vars: dict[str, str]
    on_timeout: str
    auto_resume: bool
    #: False: traffic to the sandbox's own ports needs its traffic access token
    public_traffic: bool = True
    #: what it may reach beyond the host; None: the host's default
    egress: EgressPolicy | None = None


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


def timeout_value(value: Any, name: str, maximum: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number of seconds")
    seconds = int(value)
    if not minimum <= seconds <= maximum:
        raise InvalidRequest(
            f"{name} must be between {minimum} and {maximum} seconds, not {seconds}"
        )
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


def _flag(obj: dict[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false")
    return value


def _present(value: Any) -> bool:
    """Did the caller ask for something? Empty lists and objects ask for nothing."""
    return value is not None and value != [] and value != {} and value != ""


#: network fields whose behaviour Coppice does not have yet, by their JSON name
_NETWORK_NOT_YET = {
    "dnsServers": "custom DNS servers (network.dnsServers)",
    "egressProxy": "an egress proxy (network.egressProxy)",
    "maskRequestHost": "a request host mask (network.maskRequestHost)",
    "rules": "egress transform rules (network.rules)",
    "httpsPorts": "TLS-terminated ports (network.httpsPorts)",
}


def _refuse_network_not_yet(obj: dict[str, Any]) -> None:
    for key, feature in _NETWORK_NOT_YET.items():
        if _present(obj.get(key)):
            raise NotSupportedYet(feature, "allowOut, denyOut and allow_internet_access work")


def _public_traffic(network: Any) -> bool:
    if network is None:
        return True
    return _flag(_object(network, "network"), "allowPublicTraffic", True)


def _string_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{name} must be a list of strings")
    return value


def _egress(
    obj: dict[str, Any], network: dict[str, Any], internet_by_default: bool
) -> EgressPolicy | None:
    """The rules a create or an update states; None when it states none (the host's
    default applies, and can change with the host's configuration)."""
    _refuse_network_not_yet(network)
    internet = obj.get("allow_internet_access")
    allow = _string_list(network.get("allowOut"), "network.allowOut")
    deny = _string_list(network.get("denyOut"), "network.denyOut")
    if internet is None and not allow and not deny:
        return None
    return EgressPolicy.parse(_flag(obj, "allow_internet_access", internet_by_default), allow, deny)


def parse_network_update(body: Any, internet_by_default: bool) -> EgressPolicy | None:
    """`PUT /sandboxes/{id}/network`: the whole new rule set (an omitted field is cleared)."""
    obj = _object(body, "the request body")
    return _egress(obj, obj, internet_by_default)


def egress_json(policy: EgressPolicy | None, internet_by_default: bool) -> dict[str, Any]:
    """`allowInternetAccess` and the egress half of `network`, as a sandbox's detail has them."""
    if policy is None:
        return {"allowInternetAccess": internet_by_default}
    network: dict[str, Any] = {}
    if policy.allow_out():
        network["allowOut"] = policy.allow_out()
    if policy.deny_out():
        network["denyOut"] = policy.deny_out()
    return {"allowInternetAccess": policy.allow_internet, "network": network}


def refuse_unsupported_create_fields(obj: dict[str, Any]) -> None:
    """Fields E2B honours and Coppice cannot yet: a 400 that names them, never a silent
    success that leaves the caller believing they took effect."""
    if obj.get("secure") is False:
        raise NotSupportedYet(
            "secure=false (a sandbox without an access token)",
            "every Coppice sandbox is secured; drop the field",
        )
    if _present(obj.get("mcp")):
        raise NotSupportedYet("the MCP gateway (mcp)")
    if _present(obj.get("volumeMounts")):
        raise NotSupportedYet("volume mounts (volumeMounts)")
    iam = obj.get("iam")
    if _present(iam) and (not isinstance(iam, dict) or _present(iam.get("tokens"))):
        raise NotSupportedYet("workload identity (iam)")


def parse_create(
    body: Any, default_timeout: int, max_timeout: int, internet_by_default: bool = True
) -> CreateRequest:
    obj = _object(body, "the request body")
    template_id = obj.get("templateID")
    if not isinstance(template_id, str) or not template_id:
        raise InvalidRequest("templateID is required and must be a non-empty string")
    timeout = obj.get("timeout")
    auto_pause = _enabled(obj.get("autoPause"), "autoPause")
    # E2B's `lifecycle` mode "filesystem": a timeout's pause keeps the files only.
    files_only = not _flag(obj, "autoPauseMemory", True)
    refuse_unsupported_create_fields(obj)
    network = obj.get("network")
    return CreateRequest(
        template_id=template_id,
        timeout_s=default_timeout
        if timeout is None
        else timeout_value(timeout, "timeout", max_timeout),
        metadata=_string_map(obj.get("metadata"), "metadata"),
        env_vars=_string_map(obj.get("envVars"), "envVars"),
        on_timeout=("pause_files" if files_only else "pause") if auto_pause else "kill",
        auto_resume=_enabled(obj.get("autoResume"), "autoResume"),
        public_traffic=_public_traffic(network),
        egress=_egress(
            obj, {} if network is None else _object(network, "network"), internet_by_default
        ),
    )


@dataclass(frozen=True)
class PauseRequest:
    #: check that the agent answers before pausing (the SDK's strict=True)
    strict: bool
    #: keep memory and processes (a freeze); False: stop the processes, keep the files
    keep_memory: bool


def parse_pause(body: Any) -> PauseRequest:
    obj = _object(body, "the request body")
    return PauseRequest(
        strict=_flag(obj, "requireHealthyGuest", False),
        keep_memory=_flag(obj, "memory", True),
    )


@dataclass(frozen=True)
class ConnectRequest:
    #: the new timeout, if the caller gave one
    timeout_s: int | None
    #: the caller asked to boot on the files rather than restore memory (on_resume="reboot")
    reboot: bool = False


def parse_connect(body: Any, max_timeout: int) -> ConnectRequest:
    """The connect/resume body."""
    obj = _object(body, "the request body")
    reboot = not _flag(obj, "memory", True)
    if obj.get("timeout") is None:
        return ConnectRequest(None, reboot)
    return ConnectRequest(timeout_value(obj["timeout"], "timeout", max_timeout, minimum=0), reboot)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: entry states E2B's API calls paused (the rest of a handed-out sandbox's are running)
PAUSED_STATES = frozenset({State.PAUSED, State.PAUSED_FILES, State.RESUMING})


def state_of(h: HandedOut) -> str:
    return "paused" if h.entry.state in PAUSED_STATES else "running"


def pause_json(h: HandedOut, persistence: Persistence) -> dict[str, Any] | None:
    """What a paused sandbox kept (beyond E2B's fields: the SDK ignores it), so that nobody
    takes a freeze for something a host reboot spares when it is not."""
    if h.entry.state is State.PAUSED:
        survives = persistence.memory_pause_survives_reboot
        return {"memory": True, "files": True, "memorySurvivesHostReboot": survives}
    if h.entry.state in PAUSED_STATES:
        return {"memory": False, "files": True, "memorySurvivesHostReboot": False}
    return None


def sandbox_json(h: HandedOut, template: str) -> dict[str, Any]:
    """The `Sandbox` model: create, connect and resume answer with it."""
    return {
        "sandboxID": h.sandbox.id,
        "templateID": h.sandbox.template_id,
        "clientID": CLIENT_ID,
        "alias": template,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": h.sandbox.access_token,
        "trafficAccessToken": h.sandbox.traffic_token,
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


def detail_json(
    h: HandedOut,
    template: str,
    limits: Limits,
    internet_by_default: bool = True,
    paused: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body = {
        **listed_json(h, template, limits),
        "envdAccessToken": h.sandbox.access_token,
        "domain": None,
        "lifecycle": {"autoResume": h.sandbox.auto_resume, "onTimeout": h.sandbox.on_timeout},
        **egress_json(h.sandbox.egress, internet_by_default),
    }
    body.setdefault("network", {})["allowPublicTraffic"] = h.sandbox.traffic_token is None
    if paused is not None:
        body["pause"] = paused
    return body


def build_id(t: TemplateRecord) -> str:
    """E2B's build ids are UUIDs; a version built without the build API (the CLI, a recipe)
    is named by its recipe hash, shaped as one."""
    try:
        return str(uuid.UUID(hex=t.recipe_hash[:32]))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_OID, t.recipe_hash))


def build_json(b: TemplateBuildRecord) -> dict[str, Any]:
    """One `TemplateBuild`: a build and what its sandboxes get."""
    body: dict[str, Any] = {
        "buildID": b.id,
        "status": b.status,
        "createdAt": iso(b.created_at),
        "updatedAt": iso(b.updated_at),
        "cpuCount": max(1, round(b.limits.cpus)),
        "memoryMB": b.limits.memory_mb,
        "diskSizeMB": b.limits.disk_mb,
        "envdVersion": ENVD_VERSION,
    }
    if b.finished_at is not None:
        body["finishedAt"] = iso(b.finished_at)
    return body


def template_builds_json(
    t: TemplateRecord,
    aliases: tuple[str, ...],
    limits: Limits,
    builds: Sequence[TemplateBuildRecord],
    current: TemplateBuildRecord,
) -> dict[str, Any]:
    """`GET /templates/{id}`: the template (the SDK reads every `Template` field here, more
    than the published spec lists) with its builds, newest first."""
    return {
        **template_json(t, aliases, limits, builds, current),
        "builds": [build_json(b) for b in builds],
    }


def template_json(
    t: TemplateRecord,
    aliases: tuple[str, ...],
    limits: Limits,
    builds: Sequence[TemplateBuildRecord],
    current: TemplateBuildRecord,
) -> dict[str, Any]:
    """One template as the lists show it; `current` is the build that serves, `builds` all
    of them newest first (its status is the template's `buildStatus`, as E2B's)."""
    created = min([t.built_at, *(b.created_at for b in builds)])
    return {
        "templateID": t.name,
        "buildID": current.id,
        "aliases": list(aliases),
        "names": [t.name, *aliases],
        "cpuCount": max(1, round(limits.cpus)),
        "memoryMB": limits.memory_mb,
        "diskSizeMB": limits.disk_mb,
        "public": True,
        "createdAt": iso(created),
        "updatedAt": iso(max([t.built_at, *(b.updated_at for b in builds)])),
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": max(1, len(builds)),
        "buildStatus": builds[0].status if builds else "ready",
        "envdVersion": ENVD_VERSION,
        "createdBy": None,
        "substrate": t.substrate,
    }


def unbuilt_template_json(name: str, builds: Sequence[TemplateBuildRecord]) -> dict[str, Any]:
    """`GET /templates/{id}` of a template asked for whose builds have not succeeded yet:
    what its latest build asked for, and its builds."""
    latest = builds[0]
    return {
        "templateID": name,
        "buildID": latest.id,
        "aliases": [],
        "names": [name],
        "cpuCount": max(1, round(latest.limits.cpus)),
        "memoryMB": latest.limits.memory_mb,
        "diskSizeMB": latest.limits.disk_mb,
        "public": True,
        "createdAt": iso(min(b.created_at for b in builds)),
        "updatedAt": iso(max(b.updated_at for b in builds)),
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": len(builds),
        "buildStatus": latest.status,
        "envdVersion": ENVD_VERSION,
        "createdBy": None,
        "builds": [build_json(b) for b in builds],
    }


@dataclass(frozen=True)
class ListQuery:
    metadata: dict[str, str]
    states: frozenset[str]
    limit: int
    after: tuple[float, str] | None  # (started_at, id) of the last item of the previous page
    newest_first: bool = True  # E2B's default order
    started_after: float | None = None
    template: str | None = None

    @property
    def counts_running(self) -> bool:
        """E2B reports X-Total-Running only when running sandboxes were asked for."""
        return not self.states or "running" in self.states


#: query parameters of `GET /v2/sandboxes`; any other is a 400, not silently ignored
LIST_PARAMETERS = frozenset(
    {"metadata", "state", "order", "startedAfter", "template", "nextToken", "limit"}
)
#: the deprecated v1 list knows only the metadata filter
LIST_V1_PARAMETERS = frozenset({"metadata"})


def parse_list_query(
    params: dict[str, str],
    max_limit: int = 100,
    known: frozenset[str] = LIST_PARAMETERS,
) -> ListQuery:
    unknown_params = sorted(set(params) - known)
    if unknown_params:
        raise InvalidRequest(
            f"unknown query parameter(s) {unknown_params}; this list takes {sorted(known)}"
        )
    metadata: dict[str, str] = {}
    if params.get("metadata"):
        # The SDK percent-quotes each key and value and joins them as a form string.
        metadata = dict(parse_qsl(params["metadata"], keep_blank_values=True))
    states = frozenset(s for s in params.get("state", "").split(",") if s)
    unknown = states - {"running", "paused"}
    if unknown:
        raise InvalidRequest(f"state must be running and/or paused, not {sorted(unknown)}")
    raw_limit = params.get("limit", str(min(100, max_limit)))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= max_limit:
        raise InvalidRequest(f"limit must be a whole number between 1 and {max_limit}")
    after = None
    if params.get("nextToken"):
        after = decode_token(params["nextToken"])
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be asc or desc, not {order!r}")
    template = params.get("template") or None
    return ListQuery(
        metadata,
        states,
        int(raw_limit),
        after,
        newest_first=order == "desc",
        started_after=_timestamp(params["startedAfter"], "startedAfter")
        if params.get("startedAfter")
        else None,
        template=template,
    )


def _timestamp(value: str, name: str) -> float:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"{name} must be an ISO 8601 date-time such as 2026-01-01T12:00:00Z, not {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)  # E2B reads a zone-less time as UTC
    return parsed.timestamp()


def encode_token(started_at: float, sandbox_id: str) -> str:
    return base64.urlsafe_b64encode(f"{started_at!r}|{sandbox_id}".encode()).decode()


def decode_token(token: str) -> tuple[float, str]:
    try:
        started, _, sandbox_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return float(started), sandbox_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("nextToken is not a token this gateway handed out") from None
