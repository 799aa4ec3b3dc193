"""What every control-plane handler first takes from its request: who is calling (with the
scope the request needs) and its JSON body."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from coppice.errors import InvalidRequest
from coppice.gateway.auth import Principal
from coppice.gateway.auth import Scope as KeyScope


def caller(request: Request, scope: KeyScope) -> Principal:
    principal: Principal = request.app.state.gateway.keys.authenticate(request.headers)
    principal.require(scope)
    return principal


async def json_body(request: Request, default: Any = None) -> Any:
    raw = await request.body()
    if not raw.strip():
        return default
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
