"""The gateway's ASGI application: E2B's control plane plus in-sandbox routing on one origin.

Every error leaves through `_coppice_error` (or the two fallbacks beside it) as E2B's
`{"code", "message"}` body: this module is the HTTP boundary of the `CoppiceError` tree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from coppice.config import Settings
from coppice.errors import (
    CoppiceError,
    GuestUnresponsive,
    InvalidRequest,
    PoolExhausted,
    SubstrateError,
)
from coppice.gateway.auth import KeyRing, Principal
from coppice.gateway.auth import Scope as KeyScope
from coppice.gateway.catalog import TemplateCatalog
from coppice.gateway.keeper import PoolKeeper
from coppice.gateway.proxy import (
    TRAFFIC_TOKEN_HEADER,
    SandboxDirectory,
    SandboxProxy,
    SandboxUnreachable,
    Target,
    error,
    needs_token,
    not_found,
    target_of,
    token_ok,
    traffic_allowed,
)
from coppice.gateway.sandbox_logs import (
    MAX_CONSOLE_BYTES,
    LogLine,
    legacy_logs_json,
    logs_json,
    parse_console,
    parse_log_query,
    select,
)
from coppice.gateway.sandboxes import SandboxService
from coppice.gateway.signed_urls import is_presigned_files_request, signed_for
from coppice.gateway.wire import (
    LIST_V1_PARAMETERS,
    detail_json,
    listed_json,
    parse_connect,
    parse_create,
    parse_list_query,
    parse_pause,
    sandbox_json,
    template_builds_json,
    template_json,
    timeout_value,
)
from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.store.records import HandedOut
from coppice.substrates.base import AGENT_PORT

log = logging.getLogger("coppice.gateway")
_IDEMPOTENCY_KEY = re.compile(r"^[a-z0-9-]{1,255}$")
#: tries to hand out a sandbox whose agent accepts its identity before giving up
INIT_ATTEMPTS = 3


@dataclass
class Gateway:
    settings: Settings
    controller: PoolController
    keys: KeyRing
    keeper: PoolKeeper
    service: SandboxService
    proxy: SandboxProxy
    directory: SandboxDirectory

    def template_of(self, handed: HandedOut) -> str:
        return handed.entry.template

    def dial(self, handed: HandedOut, port: int = AGENT_PORT) -> tuple[str, int]:
        """Where a sandbox port is reached: its driver says where its agent listens (the
        E2B protocol names envd's port 49983 whatever the driver does); other ports are on
        the same host."""
        handle = handed.entry.handle
        if handle is None:
            raise SandboxUnreachable(handed.sandbox.id, port)
        sub = self.controller.substrate(handed.entry.substrate)
        host, agent_port = sub.agent_address(handle)
        return host, agent_port if port == AGENT_PORT else port


def _who(request: Request, scope: KeyScope) -> Principal:
    gw: Gateway = request.app.state.gateway
    principal = gw.keys.authenticate(request.headers)
    principal.require(scope)
    return principal


async def _json(request: Request, default: Any = None) -> Any:
    raw = await request.body()
    if not raw.strip():
        return default
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


T = TypeVar("T")


def _run(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
    return anyio.to_thread.run_sync(fn, *args)


# -- control plane ----------------------------------------------------------------------------


async def create_sandbox(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.CREATE)
    key = request.headers.get("idempotency-key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise InvalidRequest("Idempotency-Key must be 1-255 characters of a-z, 0-9 and -")
    req = parse_create(
        await _json(request), gw.settings.default_timeout_s, gw.settings.max_timeout_s
    )
    last: Exception | None = None
    for _ in range(INIT_ATTEMPTS):
        handed, fresh = await _run(gw.service.create, req, who, key)
        if not fresh:
            return JSONResponse(sandbox_json(handed, gw.template_of(handed)), status_code=201)
        try:
            await _init_agent(gw, handed)
        except SandboxUnreachable as exc:
            # It died between its readiness probe and now: never hand that out; try another.
            last = exc
            await _run(gw.service.kill, who, handed.sandbox.id)
            continue
        return JSONResponse(sandbox_json(handed, gw.template_of(handed)), status_code=201)
    raise SubstrateError(f"sandboxes failed to start their agent: {last}")


async def _init_agent(gw: Gateway, handed: HandedOut) -> None:
    """Give the agent its identity: sandbox-wide env vars, access token, default user."""
    body = {
        "envVars": handed.sandbox.env_vars,
        "accessToken": handed.sandbox.access_token,
        "defaultUser": "user",
    }
    host, port = gw.dial(handed)
    url = f"http://{host}:{port}/init"
    try:
        answer = await gw.proxy.client(handed.sandbox.id).post(url, json=body, timeout=10.0)
    except Exception as exc:
        raise SandboxUnreachable(handed.sandbox.id, AGENT_PORT) from exc
    if answer.status_code >= 300:
        raise SandboxUnreachable(handed.sandbox.id, AGENT_PORT)


async def list_sandboxes(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    query = parse_list_query(dict(request.query_params))
    page = await _run(gw.service.page, who, query)
    body = [
        listed_json(h, gw.template_of(h), gw.service.limits(gw.template_of(h))) for h in page.items
    ]
    headers = {"x-next-token": page.next_token} if page.next_token else {}
    if page.total_running is not None:
        headers["x-total-running"] = str(page.total_running)
    return JSONResponse(body, headers=headers)


async def list_sandboxes_v1(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    params = dict(request.query_params)
    parse_list_query(params, known=LIST_V1_PARAMETERS)  # only to refuse what v1 does not take
    query = parse_list_query({**params, "limit": "1000"}, max_limit=1000)
    page = await _run(gw.service.page, who, query)
    return JSONResponse(
        [
            listed_json(h, gw.template_of(h), gw.service.limits(gw.template_of(h)))
            for h in page.items
        ]
    )


async def get_sandbox(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    handed = await _run(gw.service.get, who, request.path_params["sandbox_id"])
    template = gw.template_of(handed)
    return JSONResponse(detail_json(handed, template, gw.service.limits(template)))


async def kill_sandbox(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    await _run(gw.service.kill, who, request.path_params["sandbox_id"])
    gw.directory.forget(request.path_params["sandbox_id"])
    await gw.proxy.forget(request.path_params["sandbox_id"])
    return Response(status_code=204)


async def set_timeout(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    body = await _json(request, {})
    if not isinstance(body, dict) or "timeout" not in body:
        raise InvalidRequest('the body must be {"timeout": <seconds>}')
    # 0 is E2B's "expire now": the reaper acts on it at once.
    seconds = timeout_value(body["timeout"], "timeout", gw.settings.max_timeout_s, minimum=0)
    await _run(gw.service.set_timeout, who, request.path_params["sandbox_id"], seconds)
    if seconds == 0:
        gw.keeper.wake()
    return Response(status_code=204)


async def refresh(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    body = await _json(request, {})
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be {"duration": <seconds>}')
    seconds = timeout_value(body.get("duration", 60), "duration", gw.settings.max_timeout_s)
    await _run(gw.service.refresh, who, request.path_params["sandbox_id"], seconds)
    return Response(status_code=204)


async def pause(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    sandbox_id = request.path_params["sandbox_id"]
    if parse_pause(await _json(request, {})):
        handed = await _run(gw.service.get, who, sandbox_id)
        if handed.entry.state is State.IN_USE and not await _agent_answers(gw, handed):
            raise GuestUnresponsive(sandbox_id)
    await _run(gw.service.pause, who, sandbox_id)
    gw.directory.forget(request.path_params["sandbox_id"])
    return Response(status_code=204)


async def _agent_answers(gw: Gateway, handed: HandedOut) -> bool:
    try:
        host, port = gw.dial(handed)
    except SandboxUnreachable:
        return False
    url = f"http://{host}:{port}/health"
    try:
        answer = await gw.proxy.client(handed.sandbox.id).get(url, timeout=5.0)
    except Exception:
        return False
    return answer.status_code < 300


async def resume(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    timeout = parse_connect(await _json(request, {}), gw.settings.max_timeout_s)
    handed = await _run(gw.service.resume, who, request.path_params["sandbox_id"], timeout)
    gw.directory.forget(handed.sandbox.id)
    return JSONResponse(sandbox_json(handed, gw.template_of(handed)), status_code=201)


async def connect(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    timeout = parse_connect(await _json(request, {}), gw.settings.max_timeout_s)
    sandbox_id = request.path_params["sandbox_id"]
    was_paused = (await _run(gw.service.get, who, sandbox_id)).entry.state is State.PAUSED
    handed = await _run(gw.service.connect, who, sandbox_id, timeout)
    gw.directory.forget(sandbox_id)
    status = 201 if was_paused else 200
    return JSONResponse(sandbox_json(handed, gw.template_of(handed)), status_code=status)


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    await _run(gw.service.get, who, request.path_params["sandbox_id"])
    return JSONResponse([])


async def _catalog_json(gw: Gateway) -> list[dict[str, Any]]:
    records = await _run(gw.service.catalog.all)
    return [template_json(t, t.policy.aliases, gw.service.limits(t.name)) for t in records]


async def templates(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    _who(request, KeyScope.READ)
    return JSONResponse(await _catalog_json(gw))


async def templates_v2(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    _who(request, KeyScope.READ)
    unknown = sorted(set(request.query_params) - {"teamID", "limit", "nextToken"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s) {unknown}")
    if request.query_params.get("nextToken"):
        return JSONResponse([])  # every template fits on the first page
    return JSONResponse(await _catalog_json(gw))


async def template_detail(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    _who(request, KeyScope.READ)
    record = await _run(gw.service.catalog.resolve, request.path_params["template_id"])
    return JSONResponse(
        template_builds_json(record, record.policy.aliases, gw.service.limits(record.name))
    )


async def template_alias(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    _who(request, KeyScope.READ)
    record = await _run(gw.service.catalog.resolve, request.path_params["alias"])
    return JSONResponse({"templateID": record.name, "public": True})


async def sandbox_logs(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    query = parse_log_query(dict(request.query_params))
    lines = await _run(_console_lines, gw, who, request.path_params["sandbox_id"])
    return JSONResponse(logs_json(select(lines, query)))


async def sandbox_logs_v1(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    params = dict(request.query_params)
    unknown = sorted(set(params) - {"start", "limit"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s) {unknown}; v1 logs take start, limit")
    query = parse_log_query(
        {
            k: v
            for k, v in {"cursor": params.get("start"), "limit": params.get("limit")}.items()
            if v
        }
    )
    lines = await _run(_console_lines, gw, who, request.path_params["sandbox_id"])
    return JSONResponse(legacy_logs_json(select(lines, query)))


def _console_lines(gw: Gateway, who: Principal, sandbox_id: str) -> list[LogLine]:
    handed = gw.service.get(who, sandbox_id)
    path = gw.controller.substrate(handed.entry.substrate).console_log(handed.entry.id)
    try:
        with path.open("rb") as console:
            size = console.seek(0, 2)
            console.seek(max(0, size - MAX_CONSOLE_BYTES))
            text = console.read().decode("utf-8", "replace")
    except FileNotFoundError:
        text = ""
    return parse_console(text, handed.sandbox.started_at)


async def gateway_health(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


ROUTES = [
    Route("/health", gateway_health, methods=["GET"]),
    Route("/v2/sandboxes", create_sandbox, methods=["POST"]),
    Route("/sandboxes", create_sandbox, methods=["POST"]),
    Route("/v2/sandboxes", list_sandboxes, methods=["GET"]),
    Route("/sandboxes", list_sandboxes_v1, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", get_sandbox, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", kill_sandbox, methods=["DELETE"]),
    Route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/refreshes", refresh, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/pause", pause, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/resume", resume, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/v2/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/metrics", metrics, methods=["GET"]),
    Route("/templates", templates, methods=["GET"]),
    Route("/v2/templates", templates_v2, methods=["GET"]),
    Route("/templates/aliases/{alias:path}", template_alias, methods=["GET"]),
    Route("/templates/{template_id}", template_detail, methods=["GET"]),
    Route("/v2/sandboxes/{sandbox_id}/logs", sandbox_logs, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}/logs", sandbox_logs_v1, methods=["GET"]),
]


# -- the error boundary ------------------------------------------------------------------------


async def _coppice_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, CoppiceError)
    headers = {}
    if isinstance(exc, PoolExhausted):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    body: dict[str, Any] = {"code": exc.http_status, "message": str(exc)}
    if exc.error_code is not None:
        body["error_code"] = exc.error_code
    return JSONResponse(body, exc.http_status, headers=headers)


async def _unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unexpected error", exc_info=exc)
    return error(500, f"internal error: {type(exc).__name__}: {exc}")


async def _http_error(_: Request, exc: Exception) -> Response:
    status = int(getattr(exc, "status_code", 500))
    return error(status, str(getattr(exc, "detail", "")) or "no such endpoint")


# -- in-sandbox routing ------------------------------------------------------------------------


#: where GatewayApp leaves the sandbox it found for a request that did not name one
_TARGET_KEY = "coppice.target"


async def relay(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    target = request.scope.get(_TARGET_KEY) or target_of(request, gw.settings.sandbox_domain)
    assert isinstance(target, Target)
    handed = gw.directory.get(target.sandbox_id)
    if handed is None:
        await gw.proxy.forget(target.sandbox_id)
        return not_found(target.sandbox_id)
    if needs_token(target, request.url.path, request.url.query) and not token_ok(handed, request):
        return error(401, "missing or wrong X-Access-Token for this sandbox")
    if not traffic_allowed(handed, target, request):
        return error(
            403,
            f"sandbox {target.sandbox_id} does not allow public traffic: send its "
            f"trafficAccessToken in the {TRAFFIC_TOKEN_HEADER} header",
        )
    if handed.entry.state is not State.IN_USE:
        gw.directory.forget(target.sandbox_id)
        resumed = await _run(gw.service.auto_resume, target.sandbox_id)
        if not resumed:
            return error(
                502,
                f"sandbox {target.sandbox_id} is paused; connect() to it resumes it",
            )
    try:
        if not 0 < target.port < 65536:
            return error(400, f"E2b-Sandbox-Port {target.port} is not a port number")
        return await gw.proxy.relay(request, handed, *gw.dial(handed, target.port))
    except SandboxUnreachable as exc:
        gw.directory.forget(target.sandbox_id)
        alive = await _run(_entry_alive, gw, handed)
        if not alive:
            return not_found(target.sandbox_id)
        return error(502, str(exc))


def _entry_alive(gw: Gateway, handed: HandedOut) -> bool:
    sub = gw.controller.substrate(handed.entry.substrate)
    return sub.is_alive(handed.entry.id, handed.entry.handle)


class GatewayApp:
    """Sends in-sandbox traffic to the relay and everything else to the control plane."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.control = Starlette(
            routes=ROUTES,
            exception_handlers={
                CoppiceError: _coppice_error,
                Exception: _unexpected,
                404: _http_error,
                405: _http_error,
            },
            lifespan=self._lifespan,
        )
        self.control.state.gateway = gateway
        self.sandboxes = Starlette(
            routes=[Route("/{path:path}", relay, methods=_METHODS)],
            exception_handlers={CoppiceError: _coppice_error, Exception: _unexpected},
        )
        self.sandboxes.state.gateway = gateway

    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        logging.getLogger("uvicorn.error").addFilter(_incomplete_relay_notice)
        loop = asyncio.get_running_loop()

        def sandbox_ended(sandbox_id: str) -> None:
            # From the keeper's threads: end the relays into a sandbox that is over, so a
            # stream from a killed VM (whose dead tap never resets the connection) aborts.
            loop.call_soon_threadsafe(lambda: loop.create_task(self._ended(sandbox_id)))

        self.gateway.keeper.on_sandbox_ended = sandbox_ended
        self.gateway.keeper.start()
        pruner = asyncio.create_task(self._prune_connections())
        try:
            yield
        finally:
            pruner.cancel()
            await anyio.to_thread.run_sync(self.gateway.keeper.stop)
            await self.gateway.proxy.aclose()

    async def _ended(self, sandbox_id: str) -> None:
        self.gateway.directory.forget(sandbox_id)
        await self.gateway.proxy.forget(sandbox_id)

    async def _prune_connections(self) -> None:
        """Close connection pools of sandboxes that ended without passing through this
        process (timeouts, deaths found by reconcile, another gateway's kill)."""
        gw = self.gateway
        while True:
            await asyncio.sleep(10)
            live = {h.sandbox.id for h in await _run(gw.service.store.list_sandboxes)}
            await gw.proxy.prune(live.__contains__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            if target_of(request, self.gateway.settings.sandbox_domain) is not None:
                await self.sandboxes(scope, receive, send)
                return
            query = scope.get("query_string", b"").decode("latin-1")
            if is_presigned_files_request(scope["path"], query):
                await self._presigned(scope, receive, send, query)
                return
        await self.control(scope, receive, send)

    async def _presigned(self, scope: Scope, receive: Receive, send: Send, query: str) -> None:
        """A presigned file URL with no routing headers (one-origin set-up): its signature
        says which sandbox it is for."""
        store = self.gateway.service.store

        def find() -> str | None:
            tokens = ((h.sandbox.id, h.sandbox.access_token) for h in store.list_sandboxes())
            return signed_for(scope["method"], query, tokens)

        sandbox_id = await _run(find)
        if sandbox_id is None:
            response = error(
                401,
                "this signed URL matches no sandbox here: its signature is wrong, or its "
                "sandbox was killed; make a new one with download_url()/upload_url()",
            )
            await response(scope, receive, send)
            return
        scope[_TARGET_KEY] = Target(sandbox_id, AGENT_PORT)
        await self.sandboxes(scope, receive, send)


_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _incomplete_relay_notice(record: logging.LogRecord) -> bool:
    """uvicorn reports every response left incomplete as an error; the relay leaves one so on
    purpose (and logs why) when a sandbox dies mid-stream. No control-plane route streams."""
    return record.getMessage() != "ASGI callable returned without completing response."


def build_gateway(settings: Settings, controller: PoolController) -> GatewayApp:
    keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)
    controller.respawn = False  # the keeper refills pools in the background
    keeper = PoolKeeper(controller, settings.pool_target_map())
    catalog = TemplateCatalog(controller.store)
    service = SandboxService(settings, controller, keeper, catalog)
    directory = SandboxDirectory(controller.store.get_sandbox)
    return GatewayApp(
        Gateway(settings, controller, keys, keeper, service, SandboxProxy(), directory)
    )
