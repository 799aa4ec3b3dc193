"""The gateway's ASGI application: E2B's control plane plus in-sandbox routing on one origin.

Every error, the control plane's and the relay's, becomes an answer in `http_errors`: E2B's
`{"code", "message"}` body, the HTTP boundary of the `CoppiceError` tree.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from coppice.config import Settings
from coppice.errors import (
    CoppiceError,
    GuestUnresponsive,
    InvalidRequest,
    SandboxNotFound,
    SandboxUnreachable,
    SubstrateError,
    Unauthorized,
)
from coppice.gateway import http_errors
from coppice.gateway.auth import KeyRing, Principal
from coppice.gateway.auth import Scope as KeyScope
from coppice.gateway.catalog import TemplateCatalog
from coppice.gateway.gateway import Gateway
from coppice.gateway.inbound import caller as _who
from coppice.gateway.inbound import json_body as _json
from coppice.gateway.keeper import PoolKeeper
from coppice.gateway.notices import SandboxNotices
from coppice.gateway.proxy import SandboxDirectory, SandboxProxy, Target, target_of
from coppice.gateway.relay import TARGET_KEY, Relay
from coppice.gateway.sandbox_logs import (
    MAX_CONSOLE_BYTES,
    LogLine,
    legacy_logs_json,
    logs_json,
    parse_console,
    parse_log_query,
    select,
)
from coppice.gateway.sandbox_metrics import SandboxMetrics, metric_json
from coppice.gateway.sandboxes import SandboxService
from coppice.gateway.service_metrics import ServiceMetrics
from coppice.gateway.signed_urls import is_presigned_files_request, signed_for
from coppice.gateway.snapshot_routes import SNAPSHOT_ROUTES
from coppice.gateway.snapshots import SnapshotService
from coppice.gateway.template_builds import BuildFunction, BuildService
from coppice.gateway.template_routes import TEMPLATE_ROUTES
from coppice.gateway.templates import TemplateService
from coppice.gateway.wire import (
    LIST_V1_PARAMETERS,
    detail_json,
    listed_json,
    parse_connect,
    parse_create,
    parse_list_query,
    parse_network_update,
    parse_pause,
    pause_json,
    sandbox_json,
    timeout_value,
)
from coppice.images.build_files import BuildFiles
from coppice.images.spec import TemplateSpec
from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.progress import Progress
from coppice.resource_usage import Metric
from coppice.store.records import HandedOut, TemplateRecord
from coppice.store.store import Store
from coppice.substrates.base import AGENT_PORT
from coppice.substrates.build_jail import template_builder

log = logging.getLogger("coppice.gateway")
_IDEMPOTENCY_KEY = re.compile(r"^[a-z0-9-]{1,255}$")
#: tries to hand out a sandbox whose agent accepts its identity before giving up
INIT_ATTEMPTS = 3


# -- control plane ----------------------------------------------------------------------------


async def create_sandbox(request: Request) -> Response:
    started = time.perf_counter()
    answer, template = await _create(request)
    gw: Gateway = request.app.state.gateway
    gw.service_metrics.created(template, time.perf_counter() - started)
    return answer


async def _create(request: Request) -> tuple[Response, str]:
    """The create's answer, and the template that served it."""
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.CREATE)
    key = request.headers.get("idempotency-key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise InvalidRequest("Idempotency-Key must be 1-255 characters of a-z, 0-9 and -")
    req = parse_create(
        await _json(request),
        gw.settings.default_timeout_s,
        gw.settings.max_timeout_s,
        gw.settings.internet_access,
    )
    last: Exception | None = None
    for _ in range(INIT_ATTEMPTS):
        handed, fresh = await gw.slow(gw.service.create, req, who, key)
        template = gw.template_of(handed)
        if not fresh:
            return JSONResponse(sandbox_json(handed, template), status_code=201), template
        try:
            await gw.init_agent(handed)
        except SandboxUnreachable as exc:
            # It died between its readiness probe and now: never hand that out; try another.
            last = exc
            await gw.quick(gw.service.kill, who, handed.sandbox.id)
            continue
        return JSONResponse(sandbox_json(handed, template), status_code=201), template
    raise SubstrateError(f"sandboxes failed to start their agent: {last}")


async def list_sandboxes(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    query = parse_list_query(dict(request.query_params))
    page = await gw.quick(gw.service.page, who, query)
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
    page = await gw.quick(gw.service.page, who, query)
    return JSONResponse(
        [
            listed_json(h, gw.template_of(h), gw.service.limits(gw.template_of(h)))
            for h in page.items
        ]
    )


async def get_sandbox(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    handed = await gw.quick(gw.service.get, who, request.path_params["sandbox_id"])
    template = gw.template_of(handed)
    persistence = gw.controller.substrate(handed.entry.substrate).persistence
    return JSONResponse(
        detail_json(
            handed,
            template,
            gw.service.limits(template),
            gw.settings.internet_access,
            pause_json(handed, persistence),
        )
    )


async def kill_sandbox(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    await gw.quick(gw.service.kill, who, request.path_params["sandbox_id"])
    return Response(status_code=204)


async def update_network(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    policy = parse_network_update(await _json(request), gw.settings.internet_access)
    await gw.quick(gw.service.update_network, who, request.path_params["sandbox_id"], policy)
    return Response(status_code=204)


async def set_timeout(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    body = await _json(request, {})
    if not isinstance(body, dict) or "timeout" not in body:
        raise InvalidRequest('the body must be {"timeout": <seconds>}')
    # 0 is E2B's "expire now": the reaper acts on it at once.
    seconds = timeout_value(body["timeout"], "timeout", gw.settings.max_timeout_s, minimum=0)
    await gw.quick(gw.service.set_timeout, who, request.path_params["sandbox_id"], seconds)
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
    await gw.quick(gw.service.refresh, who, request.path_params["sandbox_id"], seconds)
    return Response(status_code=204)


#: what each pause keeps, in its answer's header (E2B's 204 has no body to say it in)
PAUSE_KEPT_HEADER = "x-coppice-pause"


async def pause(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    sandbox_id = request.path_params["sandbox_id"]
    req = parse_pause(await _json(request, {}))
    handed = await gw.quick(gw.service.get, who, sandbox_id)
    if req.strict and handed.entry.state is State.IN_USE and not await _agent_answers(gw, handed):
        raise GuestUnresponsive(sandbox_id)
    # A files-only pause takes seconds (its processes stop, its disk is measured).
    await gw.slow(gw.service.pause, who, sandbox_id, req.keep_memory)
    persistence = gw.controller.substrate(handed.entry.substrate).persistence
    if not req.keep_memory:
        kept = "files kept on disk; processes stopped (resume starts them again)"
    elif persistence.memory_pause_survives_reboot:
        kept = "memory and files kept on disk; survives a host reboot"
    else:
        kept = "memory kept as a freeze while the host runs; a host reboot loses the memory"
    return Response(status_code=204, headers={PAUSE_KEPT_HEADER: kept})


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
    req = parse_connect(await _json(request, {}), gw.settings.max_timeout_s)
    sandbox_id = request.path_params["sandbox_id"]
    before = await gw.quick(gw.service.get, who, sandbox_id)
    handed = await gw.slow(gw.service.resume, who, sandbox_id, req.timeout_s, req.reboot)
    await _reintroduce(gw, before, handed)
    return JSONResponse(sandbox_json(handed, gw.template_of(handed)), status_code=201)


async def connect(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.MANAGE)
    req = parse_connect(await _json(request, {}), gw.settings.max_timeout_s)
    sandbox_id = request.path_params["sandbox_id"]
    before = await gw.quick(gw.service.get, who, sandbox_id)
    handed = await gw.slow(gw.service.connect, who, sandbox_id, req.timeout_s, req.reboot)
    await _reintroduce(gw, before, handed)
    status = 201 if before.entry.state in (State.PAUSED, State.PAUSED_FILES) else 200
    return JSONResponse(sandbox_json(handed, gw.template_of(handed)), status_code=status)


async def _reintroduce(gw: Gateway, before: HandedOut, after: HandedOut) -> None:
    """A files-only pause came back as new processes: its fresh agent is told who it is."""
    if before.entry.state is State.PAUSED_FILES:
        await gw.init_agent(after)


def _unix_param(params: dict[str, str], name: str) -> float | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        raise InvalidRequest(f"{name} must be a unix time in seconds, not {raw!r}")
    return float(raw)


def _metrics_of(
    gw: Gateway, handed: HandedOut, start: float | None, end: float | None
) -> list[Metric]:
    cpus = gw.service.limits(handed.entry.template).cpus
    return gw.metrics.of(handed, cpus, start, end)


async def metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    params = dict(request.query_params)
    start, end = _unix_param(params, "start"), _unix_param(params, "end")
    handed = await gw.quick(gw.service.get, who, request.path_params["sandbox_id"])
    found = await gw.quick(_metrics_of, gw, handed, start, end)
    return JSONResponse([metric_json(m) for m in found])


async def batch_metrics(request: Request) -> Response:
    """The latest metric of each named sandbox the caller can see (E2B's
    `GET /sandboxes/metrics?sandbox_ids=a,b`); unknown ids are left out, as E2B does."""
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    ids = [i for i in request.query_params.get("sandbox_ids", "").split(",") if i]
    if not ids:
        raise InvalidRequest("sandbox_ids is required: a comma-separated list of sandbox ids")
    if len(ids) > 100:
        raise InvalidRequest(f"sandbox_ids lists {len(ids)} sandboxes; at most 100 at once")

    def latest() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sandbox_id in dict.fromkeys(ids):
            try:
                handed = gw.service.get(who, sandbox_id)
            except SandboxNotFound:
                continue
            found = _metrics_of(gw, handed, None, None)
            if found:
                out[sandbox_id] = metric_json(found[-1])
        return out

    return JSONResponse({"sandboxes": await gw.quick(latest)})


async def sandbox_logs(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = _who(request, KeyScope.READ)
    query = parse_log_query(dict(request.query_params))
    lines = await gw.quick(_console_lines, gw, who, request.path_params["sandbox_id"])
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
    lines = await gw.quick(_console_lines, gw, who, request.path_params["sandbox_id"])
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


async def service_metrics(request: Request) -> Response:
    """Prometheus's scrape. Not E2B's (it has no such endpoint): its numbers span every
    tenant, so it takes a key with the `metrics` scope (a bare key has every scope), sent as
    a bearer token from the scrape config."""
    gw: Gateway = request.app.state.gateway
    _who(request, KeyScope.METRICS)
    body, content_type = await gw.quick(
        gw.service_metrics.exposition, request.headers.get("accept", "")
    )
    return Response(body, headers={"Content-Type": content_type})


ROUTES = [
    Route("/health", gateway_health, methods=["GET"]),
    Route("/metrics", service_metrics, methods=["GET"]),
    Route("/v2/sandboxes", create_sandbox, methods=["POST"]),
    Route("/sandboxes", create_sandbox, methods=["POST"]),
    Route("/v2/sandboxes", list_sandboxes, methods=["GET"]),
    Route("/sandboxes", list_sandboxes_v1, methods=["GET"]),
    Route("/sandboxes/metrics", batch_metrics, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", get_sandbox, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", kill_sandbox, methods=["DELETE"]),
    Route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/network", update_network, methods=["PUT"]),
    Route("/sandboxes/{sandbox_id}/refreshes", refresh, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/pause", pause, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/resume", resume, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/v2/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/metrics", metrics, methods=["GET"]),
    *SNAPSHOT_ROUTES,
    *TEMPLATE_ROUTES,
    Route("/v2/sandboxes/{sandbox_id}/logs", sandbox_logs, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}/logs", sandbox_logs_v1, methods=["GET"]),
]


# -- the error boundary ------------------------------------------------------------------------


async def _coppice_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, CoppiceError)
    return http_errors.from_coppice(exc)


async def _unexpected(_: Request, exc: Exception) -> Response:
    return http_errors.unexpected(exc)


async def _http_error(_: Request, exc: Exception) -> Response:
    status = int(getattr(exc, "status_code", 500))
    return http_errors.error(status, str(getattr(exc, "detail", "")) or "no such endpoint")


# -- the app ---------------------------------------------------------------------------------


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
        self.relay = Relay(gateway)

    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        logging.getLogger("uvicorn.error").addFilter(_incomplete_relay_notice)
        loop = asyncio.get_running_loop()
        gw = self.gateway

        def ended(sandbox_id: str) -> None:
            # From worker threads: end the relays into a sandbox that is over, so a stream
            # from a killed VM (whose dead tap never resets the connection) aborts.
            gw.directory.forget(sandbox_id)
            loop.call_soon_threadsafe(lambda: loop.create_task(gw.proxy.forget(sandbox_id)))

        gw.keeper.notices.subscribe(gw.directory.forget, ended)
        gw.keeper.notices.subscribe(lambda _: None, gw.service_metrics.ended)
        gw.keeper.start()
        await anyio.to_thread.run_sync(gw.templates.builds.start)
        pruner = asyncio.create_task(self._prune_connections())
        try:
            yield
        finally:
            pruner.cancel()
            await anyio.to_thread.run_sync(gw.templates.builds.stop)
            await anyio.to_thread.run_sync(gw.keeper.stop)
            await gw.proxy.aclose()

    async def _prune_connections(self) -> None:
        """Close connection pools of sandboxes that ended without passing through this
        process (deaths found by reconcile, another gateway's kill)."""
        gw = self.gateway
        while True:
            await asyncio.sleep(10)
            live = {h.sandbox.id for h in await gw.quick(gw.service.store.list_sandboxes)}
            await gw.proxy.prune(live.__contains__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = target_of(Headers(scope=scope), self.gateway.settings.sandbox_domain)
            if target is not None:
                scope[TARGET_KEY] = target
                await self.relay(scope, receive, send)
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

        sandbox_id = await self.gateway.quick(find)
        if sandbox_id is None:
            response = http_errors.from_coppice(
                Unauthorized(
                    "this signed URL matches no sandbox here: its signature is wrong, or its "
                    "sandbox was killed; make a new one with download_url()/upload_url()"
                )
            )
            await response(scope, receive, send)
            return
        scope[TARGET_KEY] = Target(sandbox_id, AGENT_PORT)
        await self.relay(scope, receive, send)


def _incomplete_relay_notice(record: logging.LogRecord) -> bool:
    """uvicorn reports every response left incomplete as an error; the relay leaves one so on
    purpose (and logs why) when a sandbox dies mid-stream. No control-plane route streams."""
    return record.getMessage() != "ASGI callable returned without completing response."


def build_gateway(
    settings: Settings, controller: PoolController, build: BuildFunction | None = None
) -> GatewayApp:
    """The gateway over `controller`; `build` makes templates (the build jail's builder
    unless a test gives its own)."""
    keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)
    controller.respawn = False  # the keeper refills pools in the background
    counted = ServiceMetrics()
    controller.observer = counted
    sandbox_metrics = SandboxMetrics(controller)
    keeper = PoolKeeper(
        controller,
        settings.pool_target_map(),
        notices=SandboxNotices(),
        on_tick=sandbox_metrics.sample_if_due,
    )
    counted.watch_store(
        controller.store,
        keeper.targets,
        lambda: {t: d.why.value for t, d in keeper.decisions().items()},
        keeper.admission.waiting_by_template,
    )
    catalog = TemplateCatalog(controller.store, settings.limits)
    service = SandboxService(settings, controller, keeper, catalog, counted)
    directory = SandboxDirectory(controller.store.get_sandbox)
    builds = BuildService(
        controller.store,
        settings.state_dir,
        build or _jail_builder(settings, controller.store),
        on_built=lambda record: keeper.template_changed(record.name),
        parallelism=settings.template_build_parallelism,
    )
    templates = TemplateService(settings, controller, keeper, catalog, builds)
    return GatewayApp(
        Gateway(
            settings,
            controller,
            keys,
            keeper,
            service,
            SandboxProxy(),
            directory,
            templates,
            sandbox_metrics,
            counted,
            SnapshotService(controller.store, service.snapshots, catalog),
        )
    )


def _jail_builder(settings: Settings, store: Store) -> BuildFunction:
    def build(spec: TemplateSpec, files: BuildFiles, progress: Progress) -> TemplateRecord:
        return template_builder(settings, store, progress).build_spec(spec, files)[0]

    return build
