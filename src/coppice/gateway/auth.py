"""API keys: who is calling the control plane, and what they may do.

Keys come from `api_keys` (COPPICE_API_KEYS) and `api_keys_file`. Each item is a bare key
(tenant "default", every scope) or `tenant:key:scope|scope`. Keys are compared in constant
time; a request's key is looked up against every configured key, not by dictionary access,
so timing says nothing about which prefix matched.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from coppice.errors import Forbidden, InvalidRequest, Unauthorized

DEFAULT_TENANT = "default"


class Scope(enum.StrEnum):
    CREATE = "create"  # create sandboxes
    READ = "read"  # get, list, templates, metrics
    MANAGE = "manage"  # kill, timeout, pause, resume, connect
    #: scrape GET /metrics: counts across every tenant, so an operator's, not a tenant's
    METRICS = "metrics"


ALL_SCOPES = frozenset(Scope)


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[Scope]

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes:
            raise Forbidden(f"this API key lacks the {scope.value!r} scope")


@dataclass(frozen=True)
class ApiKey:
    key: str
    principal: Principal


def parse_keys(spec: str, where: str = "api_keys") -> list[ApiKey]:
    keys = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parts = item.split(":")
        if len(parts) == 1:
            keys.append(ApiKey(parts[0], Principal(DEFAULT_TENANT, ALL_SCOPES)))
            continue
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise InvalidRequest(
                f"{where}: {_redact(item)!r} is neither a bare key nor tenant:key:scope|scope"
            )
        tenant, key, scope_list = parts
        try:
            scopes = frozenset(Scope(s) for s in scope_list.split("|") if s)
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise InvalidRequest(
                f"{where}: key of tenant {tenant!r} has an unknown scope in {scope_list!r} "
                f"(known scopes: {known})"
            ) from None
        keys.append(ApiKey(key, Principal(tenant, scopes or ALL_SCOPES)))
    return keys


def _redact(item: str) -> str:
    return item[:3] + "…" if len(item) > 3 else "…"


class KeyRing:
    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = list(keys)

    @classmethod
    def from_settings(cls, api_keys: str, api_keys_file: str) -> KeyRing:
        keys = parse_keys(api_keys)
        if api_keys_file:
            path = Path(api_keys_file)
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise InvalidRequest(f"api_keys_file {path}: {exc.strerror}") from exc
            for n, line in enumerate(lines, start=1):
                text = line.split("#", 1)[0].strip()
                keys += parse_keys(text, f"{path}:{n}")
        return cls(keys)

    @property
    def open(self) -> bool:
        """No keys configured: anyone who can reach the gateway may use it."""
        return not self._keys

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        presented = headers.get("x-api-key")
        if presented is None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() == "bearer" and token:
                presented = token.strip()
        if self.open:
            return Principal(DEFAULT_TENANT, ALL_SCOPES)
        if not presented:
            raise Unauthorized("missing API key: send it as X-API-Key or Authorization: Bearer")
        found: Principal | None = None
        for k in self._keys:
            # Compare with every key (no early exit) so the time taken does not depend on
            # where in the list a match sits.
            if hmac.compare_digest(k.key.encode(), presented.encode()):
                found = k.principal
        if found is None:
            raise Unauthorized("invalid API key")
        return found
