"""E2B's snapshot and fork endpoints: `POST /sandboxes/{id}/snapshots`, `GET /snapshots`
and `POST /sandboxes/{id}/fork`. A snapshot is deleted by `DELETE /templates/{id}`, as the
SDK's `delete_snapshot` sends it (template_routes hands it here first)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coppice.errors import CoppiceError, SandboxUnreachable
from coppice.gateway.auth import Principal
from coppice.gateway.auth import Scope as KeyScope
from coppice.gateway.gateway import Gateway
from coppice.gateway.inbound import caller
from coppice.gateway.inbound import json_body as _json
from coppice.gateway.snapshot_wire import (
    fork_error_json,
    parse_fork_request,
    parse_snapshot_query,
    parse_snapshot_request,
    snapshot_json,
)
from coppice.gateway.wire import sandbox_json
from coppice.store.records import HandedOut


async def take_snapshot(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = caller(request, KeyScope.MANAGE)
    req = parse_snapshot_request(await _json(request, {}))
    handed = await gw.quick(gw.service.get, who, request.path_params["sandbox_id"])
    snapshot = await gw.slow(gw.snapshots.take, who, handed, req)
    return JSONResponse(snapshot_json(snapshot), status_code=201)


async def list_snapshots(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    who = caller(request, KeyScope.READ)
    query = parse_snapshot_query(dict(request.query_params))
    page = await gw.quick(gw.snapshots.page, who, query)
    headers = {"x-next-token": page.next_token} if page.next_token else {}
    return JSONResponse([snapshot_json(s) for s in page.items], headers=headers)


async def fork_sandbox(request: Request) -> Response:
    """One result per fork, a sandbox or the error that kept it from starting (201 even if
    every fork failed, as E2B: a non-201 means no fork was attempted)."""
    gw: Gateway = request.app.state.gateway
    who = caller(request, KeyScope.CREATE)
    req = parse_fork_request(await _json(request, {}), gw.settings.max_timeout_s)
    sandbox_id = request.path_params["sandbox_id"]
    outcomes = await gw.slow(gw.service.fork, who, sandbox_id, req.timeout_s, req.count)
    results: list[dict[str, Any]] = []
    for outcome in outcomes:
        if isinstance(outcome, CoppiceError):
            results.append(fork_error_json(outcome.http_status, str(outcome)))
            continue
        results.append(await _introduced(gw, who, outcome))
    return JSONResponse(results, status_code=201)


async def _introduced(gw: Gateway, who: Principal, forked: HandedOut) -> dict[str, Any]:
    """The fork's agent learns its own identity (it may hold the source's, restored from
    memory); one that cannot is killed and reported as that fork's error."""
    try:
        await gw.init_agent(forked)
    except SandboxUnreachable as exc:
        await gw.quick(gw.service.kill, who, forked.sandbox.id)
        return fork_error_json(exc.http_status, str(exc))
    return {"sandbox": sandbox_json(forked, gw.template_of(forked))}


SNAPSHOT_ROUTES = [
    Route("/sandboxes/{sandbox_id}/snapshots", take_snapshot, methods=["POST"]),
    Route("/snapshots", list_snapshots, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}/fork", fork_sandbox, methods=["POST"]),
]
