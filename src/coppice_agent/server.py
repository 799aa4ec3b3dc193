"""The agent process: envd on 49983 and the code interpreter on 49999, one event loop and one
uvicorn server listening on both sockets (the port a request arrived on picks the app).

Start-up order matters for the warm pool: the pool pauses an entry as soon as `/ready`
answers, so `/ready` waits for the default kernel to be warm, and the first `run_code` after
checkout finds it already running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from coppice_agent import identity
from coppice_agent.envd import build_envd_app
from coppice_agent.environment import SandboxEnvironment
from coppice_agent.interpreter import Interpreter, build_interpreter_app

log = logging.getLogger("coppice_agent")

ENVD_PORT = 49983
INTERPRETER_PORT = 49999


def build_envd_root(envd: ASGIApp, interpreter: Interpreter) -> Starlette:
    async def ready(_: Request) -> Response:
        if interpreter.is_ready:
            return Response(status_code=204)
        return JSONResponse({"code": 503, "message": "kernel still starting"}, status_code=503)

    return Starlette(routes=[Route("/ready", ready), Mount("/", envd)])


class PortDispatch:
    """Routes each connection to the app of the port it arrived on."""

    def __init__(self, by_port: dict[int, ASGIApp], default: ASGIApp) -> None:
        self.by_port = by_port
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        app = self.by_port.get(server[1], self.default) if server else self.default
        await app(scope, receive, send)


def _listen(port: int) -> socket.socket:
    # Named as TCP explicitly: asyncio only turns on TCP_NODELAY for sockets that say so, and
    # without it every answer on a kept-alive connection waits out delayed ACKs (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("0.0.0.0", port))  # noqa: S104 - the sandbox's own interface; only the host reaches it
    sock.set_inheritable(False)
    return sock


async def serve(
    env: SandboxEnvironment, ports: tuple[int, int] = (ENVD_PORT, INTERPRETER_PORT)
) -> None:
    interpreter = Interpreter(env)
    envd_port, interpreter_port = ports
    envd = build_envd_root(build_envd_app(env), interpreter)
    app = PortDispatch({interpreter_port: build_interpreter_app(interpreter, env)}, envd)
    config = uvicorn.Config(
        app,
        loop="auto",
        http="auto",
        ws="none",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=2,
        # Longer than the gateway's 30 s idle expiry: the client side closes idle
        # connections first, so it never reuses one this side is closing.
        timeout_keep_alive=75,
    )
    server = uvicorn.Server(config)
    # A VM clone's own address, clock and keys arrive over virtio-serial (no-op in a jail).
    identity.start()
    warm = asyncio.create_task(interpreter.start())
    warm.add_done_callback(_report_failed_warm)
    log.info(
        "agent starting: envd on port %d, code interpreter on port %d", envd_port, interpreter_port
    )
    try:
        await server.serve(sockets=[_listen(envd_port), _listen(interpreter_port)])
    finally:
        warm.cancel()
        await asyncio.gather(warm, return_exceptions=True)
        await interpreter.shutdown()


def _report_failed_warm(task: asyncio.Task[None]) -> None:
    # /ready stays 503 after this, and the pool's readiness probe reports the timeout; the
    # reason must reach the sandbox's console log, where that report points.
    if task.cancelled():
        return
    if task.exception() is not None:
        log.error("the default kernel did not start", exc_info=task.exception())
    else:
        log.info("the default kernel is ready")


def _deliberately_incomplete(record: logging.LogRecord) -> bool:
    """uvicorn calls every unfinished response an error; a download cut short on purpose
    (its file shrank) is one, and has already logged why."""
    return record.getMessage() != "ASGI callable returned without completing response."


def main() -> None:
    # The host reads these lines back as the sandbox's logs (GET /v2/sandboxes/{id}/logs):
    # an ISO UTC time and the level are what its parser keys on.
    logging.basicConfig(
        level=logging.INFO,
        format="coppice-agent %(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    logging.Formatter.converter = time.gmtime
    logging.getLogger("uvicorn.error").addFilter(_deliberately_incomplete)
    env = SandboxEnvironment(default_user=os.environ.get("COPPICE_DEFAULT_USER", "user"))
    asyncio.run(serve(env))
