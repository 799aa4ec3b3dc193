"""The envd-compatible HTTP app (port 49983): `/health`, `/envs`, `/init`, `/files`, and the
Connect services `process.Process` and `filesystem.Filesystem`.

Nothing here buffers or compresses responses: process output and watch events must reach the
client message by message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from coppice_agent.environment import SandboxEnvironment
from coppice_agent.files import FilesEndpoints, error_response
from coppice_agent.filesystem import FilesystemService
from coppice_agent.processes import DEFAULT_KEEPALIVE_INTERVAL, ProcessService
from coppice_agent.rpc.filesystem.filesystem_connect import FilesystemASGIApplication
from coppice_agent.rpc.process.process_connect import ProcessASGIApplication

# Stdin payloads arrive as one message each; leave room above connectrpc's 4 MiB default.
RPC_READ_MAX_BYTES = 32 * 1024 * 1024
_CONNECT_PREFIXES = ("/process.Process/", "/filesystem.Filesystem/")
_OPEN_PATHS = frozenset({"/health"})

log = logging.getLogger("coppice_agent.envd")


class Envd:
    """envd's services for one sandbox and the app serving them.

    `aclose()` is the one place they stop: it closes every watcher and kills every process
    tree still running. Whoever serves `app` calls it once the server has stopped (the agent:
    `server.Agent`)."""

    def __init__(
        self,
        env: SandboxEnvironment,
        *,
        processes: ProcessService | None = None,
        filesystem: FilesystemService | None = None,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> None:
        self.processes = processes or ProcessService(env, keepalive_interval=keepalive_interval)
        self.filesystem = filesystem or FilesystemService(
            env, keepalive_interval=keepalive_interval
        )
        self.app = build_envd_app(env, self.processes, self.filesystem)

    async def aclose(self) -> None:
        try:
            self.filesystem.close()
        finally:
            await self.processes.aclose()


def build_envd_app(
    env: SandboxEnvironment, processes: ProcessService, filesystem: FilesystemService
) -> ASGIApp:
    """The whole envd surface for one sandbox, serving `processes` and `filesystem`. It has no
    lifespan of its own: stopping those is their owner's job (`Envd.aclose`)."""
    process_app = ProcessASGIApplication(processes, read_max_bytes=RPC_READ_MAX_BYTES)
    filesystem_app = FilesystemASGIApplication(filesystem, read_max_bytes=RPC_READ_MAX_BYTES)

    async def health(_: Request) -> Response:
        return Response(status_code=204)

    async def envs(_: Request) -> Response:
        return JSONResponse(env.env_vars)

    async def init(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
            kwargs = _init_arguments(body)
        except (ValueError, TypeError) as exc:
            return error_response(400, f"invalid init request: {exc}")
        await env.init(**kwargs)
        # Names only: values may be secrets, and these lines are served as the sandbox's logs.
        log.info(
            "sandbox handed out: default user %s, env vars %s",
            kwargs.get("default_user") or env.default_user,
            sorted(kwargs.get("env_vars") or {}),
        )
        return Response(status_code=204)

    # Mount keeps the full path in scope["path"] (it only extends root_path), which is what
    # the Connect apps look their endpoints up by.
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET", "HEAD"]),
            Route("/envs", envs, methods=["GET"]),
            Route("/init", init, methods=["POST"]),
            *FilesEndpoints(env).routes(),
            Mount(process_app.path, app=process_app),
            Mount(filesystem_app.path, app=filesystem_app),
        ],
    )
    return AccessTokenGate(app, env)


def _init_arguments(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TypeError("expected a JSON object")
    kwargs: dict[str, Any] = {}
    env_vars = body.get("envVars")
    if env_vars is not None:
        if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise TypeError("envVars must map strings to strings")
        kwargs["env_vars"] = env_vars
    for key, argument in (
        ("accessToken", "access_token"),
        ("defaultUser", "default_user"),
        ("defaultWorkdir", "default_workdir"),
    ):
        value = body.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a string")
        kwargs[argument] = value
    return kwargs


class AccessTokenGate:
    """Once the sandbox has an access token, every request but `/health` must present it in
    `X-Access-Token`, or, for `/files`, carry a valid presigned-URL signature."""

    def __init__(self, app: ASGIApp, env: SandboxEnvironment) -> None:
        self.app = app
        self.env = env

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(_CONNECT_PREFIXES):
            response: Response = JSONResponse(
                {"code": "unauthenticated", "message": "invalid or missing access token"},
                status_code=401,
            )
        else:
            response = error_response(401, "invalid or missing access token")
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        token = self.env.access_token
        if token is None:
            return True
        presented: str | None = None
        for key, value in scope.get("headers", ()):
            if key == b"x-access-token":
                presented = value.decode("latin-1")
        if presented is not None:
            return self.env.token_ok(presented)
        if scope["path"] == "/files":
            return _signature_ok(scope, token)
        return False


def _signature_ok(scope: Scope, token: str) -> bool:
    """The SDK's presigned URLs: `signature=v1_<b64 sha256(path:op:user:token[:exp])>`."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)

    def one(name: str) -> str:
        return str(query.get(name, [""])[0])

    signature = one("signature")
    if not signature:
        return False
    operation = "write" if scope["method"] == "POST" else "read"
    expiration = one("signature_expiration")
    material = f"{one('path')}:{operation}:{one('username')}:{token}"
    if expiration:
        try:
            if int(expiration) < time.time():
                return False
        except ValueError:
            return False
        material += f":{expiration}"
    digest = base64.b64encode(hashlib.sha256(material.encode()).digest()).decode().rstrip("=")
    return hmac.compare_digest(signature.encode(), f"v1_{digest}".encode())
