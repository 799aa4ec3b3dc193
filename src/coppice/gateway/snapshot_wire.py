"""E2B's snapshot and fork JSON: `SandboxSnapshotRequest`, `SnapshotInfo`, the `/snapshots`
list's query, `SandboxForkRequest` and `SandboxForkResult`.

A snapshot is named as E2B names the template it makes: `<id>:default`, or with a name,
`<tenant>/<name>:default`; Coppice keeps one version per name (a newer snapshot takes the
name over), so `default` is the only tag.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from coppice.errors import InvalidRequest
from coppice.store.records import SnapshotRecord

#: the one tag a snapshot's name carries
SNAPSHOT_TAG = "default"
#: what a snapshot's name may be (E2B's template alias characters)
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
MAX_FORKS = 100
#: E2B's default time to live of a fork, in seconds
FORK_TIMEOUT_S = 15


@dataclass(frozen=True)
class SnapshotRequest:
    name: str | None
    #: keep memory (None: as much as the substrate can)
    memory: bool | None


def parse_snapshot_request(body: Any) -> SnapshotRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not NAME.match(name)):
        raise InvalidRequest(
            "name must be 1-100 characters of a-z, 0-9, _ and -, starting with a letter or "
            f"digit, not {name!r}"
        )
    memory = body.get("memory")
    if memory is not None and not isinstance(memory, bool):
        raise InvalidRequest("memory must be true or false")
    return SnapshotRequest(name or None, memory)


def snapshot_ref(s: SnapshotRecord) -> str:
    """What `Sandbox.create` takes to start from it (E2B's `snapshotID`)."""
    base = f"{s.tenant}/{s.name}" if s.name else s.id
    return f"{base}:{SNAPSHOT_TAG}"


def snapshot_json(s: SnapshotRecord) -> dict[str, Any]:
    """`SnapshotInfo`, plus what it kept (the SDK ignores the extra fields): where a
    substrate keeps no memory, `memory` false says so rather than implying it."""
    return {
        "snapshotID": snapshot_ref(s),
        "names": [snapshot_ref(s)] if s.name else [],
        "id": s.id,
        "sandboxID": s.source_id,
        "templateID": s.template,
        "memory": s.kept_memory,
        "sizeBytes": s.size_bytes,
    }


@dataclass(frozen=True)
class SnapshotQuery:
    sandbox_id: str | None
    name: str | None
    limit: int
    #: (created_at, id) of the last item of the previous page
    after: tuple[float, str] | None


SNAPSHOT_LIST_PARAMETERS = frozenset({"sandboxID", "name", "limit", "nextToken"})


def parse_snapshot_query(params: dict[str, str]) -> SnapshotQuery:
    unknown = sorted(set(params) - SNAPSHOT_LIST_PARAMETERS)
    if unknown:
        raise InvalidRequest(
            f"unknown query parameter(s) {unknown}; this list takes "
            f"{sorted(SNAPSHOT_LIST_PARAMETERS)}"
        )
    raw_limit = params.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise InvalidRequest("limit must be a whole number between 1 and 100")
    after = decode_snapshot_token(params["nextToken"]) if params.get("nextToken") else None
    return SnapshotQuery(
        params.get("sandboxID") or None, params.get("name") or None, int(raw_limit), after
    )


def encode_snapshot_token(created_at: float, snapshot_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{snapshot_id}".encode()).decode()


def decode_snapshot_token(token: str) -> tuple[float, str]:
    try:
        created, _, snapshot_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return float(created), snapshot_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("nextToken is not a token this gateway handed out") from None


@dataclass(frozen=True)
class ForkRequest:
    timeout_s: int
    count: int


def parse_fork_request(body: Any, max_timeout: int) -> ForkRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    count = body.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORKS:
        raise InvalidRequest(
            f"count must be a whole number between 1 and {MAX_FORKS}, not {count!r}"
        )
    timeout = body.get("timeout", FORK_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout <= max_timeout:
        raise InvalidRequest(
            f"timeout must be a whole number of seconds between 0 and {max_timeout}, "
            f"not {timeout!r}"
        )
    return ForkRequest(timeout, count)


def fork_error_json(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message}}
