"""In-sandbox traffic, as a plain ASGI app: the target (sandbox and port) is worked out once,
by `GatewayApp`, and left in the scope; here it is checked (token, private ports, paused)
and relayed. Errors leave through `http_errors` like the control plane's."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from coppice.errors import (
    CoppiceError,
    Forbidden,
    InvalidRequest,
    SandboxIsPaused,
    SandboxNotRunning,
    SandboxUnreachable,
    Unauthorized,
)
from coppice.gateway import http_errors
from coppice.gateway.gateway import Gateway
from coppice.gateway.proxy import (
    TRAFFIC_TOKEN_HEADER,
    Target,
    needs_token,
    token_ok,
    traffic_allowed,
)
from coppice.lifecycle import State
from coppice.store.records import HandedOut

#: where GatewayApp leaves the target it found, so nothing downstream matches it again
TARGET_KEY = "coppice.target"
#: how long a stream that broke waits to see its sandbox's head end (it follows the agent
#: within milliseconds); a sandbox alive after that broke for another reason
DEATH_WAIT_S = 2.0


class Relay:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = scope[TARGET_KEY]
        assert isinstance(target, Target)
        request = Request(scope, receive)
        try:
            response = await self._relay(request, target)
        except CoppiceError as exc:
            response = http_errors.from_coppice(exc)
        except Exception as exc:
            response = http_errors.unexpected(exc)
        await response(scope, receive, send)

    async def _relay(self, request: Request, target: Target) -> Response:
        gw = self.gateway
        handed = gw.directory.get(target.sandbox_id)
        if handed is None:
            await gw.proxy.forget(target.sandbox_id)
            token = request.headers.get("x-access-token", "")
            died = await gw.quick(gw.service.death_of, target.sandbox_id, token) if token else None
            raise SandboxNotRunning(target.sandbox_id, died)
        if needs_token(target, request.url.path, request.url.query) and not token_ok(
            handed, request
        ):
            raise Unauthorized("missing or wrong X-Access-Token for this sandbox")
        if not traffic_allowed(handed, target, request):
            raise Forbidden(
                f"sandbox {target.sandbox_id} does not allow public traffic: send its "
                f"trafficAccessToken in the {TRAFFIC_TOKEN_HEADER} header"
            )
        if not 0 < target.port < 65536:
            raise InvalidRequest(f"E2b-Sandbox-Port {target.port} is not a port number")
        if handed.entry.state is not State.IN_USE:
            gw.directory.forget(target.sandbox_id)
            if not await gw.quick(gw.service.auto_resume, target.sandbox_id):
                raise SandboxIsPaused(target.sandbox_id)

        async def why_it_broke() -> str | None:
            return await self._why_it_broke(request, handed)

        try:
            host, port = gw.dial(handed, target.port)
            return await gw.proxy.relay(request, handed, host, port, why_it_broke)
        except SandboxUnreachable:
            gw.directory.forget(target.sandbox_id)
            if not await gw.quick(gw.entry_alive, handed):
                died = await gw.quick(gw.service.found_dead, handed)
                # Recorded whoever asked; told only to a request proving it is the owner's.
                shown = died if token_ok(handed, request) else None
                raise SandboxNotRunning(target.sandbox_id, shown) from None
            raise

    async def _why_it_broke(self, request: Request, handed: HandedOut) -> str | None:
        """A stream from the sandbox broke: if its sandbox died, why (recorded now if
        nobody has yet), for a caller holding its token; None otherwise."""
        gw = self.gateway
        if gw.directory.get(handed.sandbox.id) is None:
            return None  # killed or timed out meanwhile: not a death
        deadline = time.monotonic() + DEATH_WAIT_S
        while await gw.quick(gw.entry_alive, handed):
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
        died = await gw.quick(gw.service.found_dead, handed)
        if died is None or not token_ok(handed, request):
            return None
        return str(SandboxNotRunning(handed.sandbox.id, died))
