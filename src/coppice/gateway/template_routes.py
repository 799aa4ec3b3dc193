"""The control plane's template endpoints: the catalog (list, get, aliases) and E2B's build
API (request a build, upload its files, start it, follow it, tag it, delete a template).

Every call but the file upload needs an API key: listing and following take the `read`
scope, building, tagging and deleting `manage`. The upload is a bare `PUT` from the SDK
(no key), allowed by the signature its URL carries.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from coppice.errors import HostResourceExhausted, InvalidRequest, SnapshotNotFound
from coppice.gateway.auth import Scope as KeyScope
from coppice.gateway.build_wire import (
    assigned_tags_json,
    build_logs_json,
    build_requested_json,
    build_status_json,
    parse_assign_tags,
    parse_build_logs_query,
    parse_build_request,
    parse_delete_tags,
    parse_status_query,
    tags_json,
)
from coppice.gateway.gateway import Gateway
from coppice.gateway.inbound import caller, json_body
from coppice.gateway.wire import template_builds_json, template_json, unbuilt_template_json

#: the largest archive one COPY step may upload
MAX_UPLOAD_BYTES = 8 << 30


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


# -- the catalog ---------------------------------------------------------------------------------


def _catalog_json(gw: Gateway) -> list[dict[str, Any]]:
    catalog = gw.service.catalog
    listed = []
    for t in catalog.all():
        builds, current = catalog.history(t)
        limits = gw.service.limits(t.name)
        listed.append(template_json(t, t.policy.aliases, limits, builds, current))
    return listed


async def templates(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.READ)
    return JSONResponse(await gw.quick(_catalog_json, gw))


async def templates_v2(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.READ)
    unknown = sorted(set(request.query_params) - {"teamID", "limit", "nextToken"})
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s) {unknown}")
    if request.query_params.get("nextToken"):
        return JSONResponse([])  # every template fits on the first page
    return JSONResponse(await gw.quick(_catalog_json, gw))


def _detail_json(gw: Gateway, template_id: str) -> dict[str, Any]:
    record, builds, current = gw.templates.detail(template_id)
    if record is None or current is None:
        return unbuilt_template_json(template_id, builds)
    limits = gw.service.limits(record.name)
    return template_builds_json(record, record.policy.aliases, limits, builds, current)


async def template_detail(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.READ)
    return JSONResponse(await gw.quick(_detail_json, gw, request.path_params["template_id"]))


async def template_alias(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.READ)
    record = await gw.quick(gw.service.catalog.resolve, request.path_params["alias"])
    return JSONResponse({"templateID": record.name, "public": True})


async def delete_template(request: Request) -> Response:
    """A template, or a snapshot: the SDK's `delete_snapshot` deletes it as E2B's template
    (`<tenant>/<name>:default` arrives as a namespaced path)."""
    gw = _gateway(request)
    who = caller(request, KeyScope.MANAGE)
    ref = request.path_params["template_id"]
    namespace = request.path_params.get("namespace")
    if namespace is not None:
        ref = f"{namespace}/{ref}"
    if await gw.slow(gw.snapshots.delete, who, ref):
        return Response(status_code=204)
    if namespace is not None:
        raise SnapshotNotFound(ref)
    await gw.slow(gw.templates.delete, ref)
    return Response(status_code=204)


# -- builds ----------------------------------------------------------------------------------------


async def request_build(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.MANAGE)
    req = parse_build_request(await json_body(request))
    build, aliases = await gw.quick(gw.templates.request_build, req)
    return JSONResponse(build_requested_json(build, aliases), status_code=202)


async def upload_link(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.MANAGE)
    p = request.path_params
    answer = await gw.quick(
        gw.templates.upload_link, p["template_id"], p["hash"], str(request.base_url)
    )
    return JSONResponse(answer, status_code=201)


async def upload_files(request: Request) -> Response:
    """The `PUT` of a COPY step's archive to a URL `upload_link` signed."""
    gw = _gateway(request)
    p, q = request.path_params, request.query_params
    target = gw.templates.upload_target(
        p["template_id"], p["hash"], q.get("expires"), q.get("signature")
    )
    try:
        await _receive(request, target)
    except ClientDisconnect:
        return Response(status_code=400)
    return Response(status_code=201)


async def _receive(request: Request, target: Path) -> None:
    """Stream the body to a file beside `target`, then move it into place: a reader never
    sees half an archive, and a broken upload leaves nothing behind."""
    await anyio.to_thread.run_sync(lambda: target.parent.mkdir(parents=True, exist_ok=True))
    part = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    size = 0
    try:
        async with await anyio.open_file(part, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_UPLOAD_BYTES:
                    raise InvalidRequest(
                        f"the upload is larger than {MAX_UPLOAD_BYTES >> 30} GiB; copy fewer files"
                    )
                await out.write(chunk)
        await anyio.to_thread.run_sync(os.replace, part, target)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HostResourceExhausted(
                "no space left for the upload; free disk space under the state directory"
            ) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            await anyio.to_thread.run_sync(part.unlink)


async def start_build(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.MANAGE)
    body = await json_body(request, {})
    if not isinstance(body, dict):
        raise InvalidRequest("the body of a build start must be a JSON object")
    p = request.path_params
    await gw.quick(gw.templates.start_build, p["template_id"], p["build_id"], body)
    return Response(status_code=202)


async def build_status(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.READ)
    query = parse_status_query(dict(request.query_params))
    p = request.path_params
    build, entries = await gw.quick(gw.templates.status, p["template_id"], p["build_id"], query)
    return JSONResponse(build_status_json(build, entries))


async def build_logs(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.READ)
    query = parse_build_logs_query(dict(request.query_params))
    p = request.path_params
    entries = await gw.quick(gw.templates.logs, p["template_id"], p["build_id"], query)
    return JSONResponse(build_logs_json(entries))


# -- tags ------------------------------------------------------------------------------------------


async def assign_tags(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.MANAGE)
    name, source, tags = parse_assign_tags(await json_body(request))
    build = await gw.quick(gw.templates.assign_tags, name, source, tags)
    return JSONResponse(assigned_tags_json(build.id, tags), status_code=201)


async def delete_tags(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.MANAGE)
    name, tags = parse_delete_tags(await json_body(request))
    await gw.quick(gw.templates.remove_tags, name, tags)
    return Response(status_code=204)


async def template_tags(request: Request) -> Response:
    gw = _gateway(request)
    caller(request, KeyScope.READ)
    tags = await gw.quick(gw.templates.tags, request.path_params["template_id"])
    return JSONResponse(tags_json(tags))


TEMPLATE_ROUTES = [
    Route("/templates", templates, methods=["GET"]),
    Route("/v2/templates", templates_v2, methods=["GET"]),
    Route("/v3/templates", request_build, methods=["POST"]),
    Route("/templates/tags", assign_tags, methods=["POST"]),
    Route("/templates/tags", delete_tags, methods=["DELETE"]),
    Route("/templates/aliases/{alias:path}", template_alias, methods=["GET"]),
    Route("/templates/{template_id}", template_detail, methods=["GET"]),
    Route("/templates/{template_id}", delete_template, methods=["DELETE"]),
    Route("/templates/{namespace}/{template_id}", delete_template, methods=["DELETE"]),
    Route("/templates/{template_id}/tags", template_tags, methods=["GET"]),
    Route("/templates/{template_id}/files/{hash}", upload_link, methods=["GET"]),
    Route("/templates/{template_id}/files/{hash}", upload_files, methods=["PUT"]),
    Route("/v2/templates/{template_id}/builds/{build_id}", start_build, methods=["POST"]),
    Route("/templates/{template_id}/builds/{build_id}/status", build_status, methods=["GET"]),
    Route("/templates/{template_id}/builds/{build_id}/logs", build_logs, methods=["GET"]),
]
