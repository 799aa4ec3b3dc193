"""The agent process: envd on 49983 and the code interpreter on 49999, one event loop and one
uvicorn server listening on both sockets (the port a request arrived on picks the app).

Start-up order matters for the warm pool: the pool pauses an entry as soon as `/ready`
answers, so `/ready` waits for the default kernel to be warm, and the first `run_code` after
checkout finds it already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from coppice_agent import identity
from coppice_agent.envd import Envd
from coppice_agent.environment import SandboxEnvironment
from coppice_agent.interpreter import Interpreter, build_interpreter_app

log = logging.getLogger("coppice_agent")

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


class Agent:
    """Every service the agent runs, and their one owner: `serve()` starts them, serves both
    ports until stopped, and stops them however serving ended. uvicorn's lifespan stays off:
    what a service needs at start and stop happens here, in one place, in order.

    The services: envd (whose stop closes every watcher and kills every process tree still
    running) and the code interpreter (whose start warms the default kernel in the
    background, and whose stop shuts every kernel down)."""

    def __init__(
        self,
        env: SandboxEnvironment,
        *,
        ports: tuple[int, int] = (ENVD_PORT, INTERPRETER_PORT),
        interpreter: Interpreter | None = None,
    ) -> None:
        self.ports = ports
        self.envd = Envd(env)
        self.interpreter = interpreter or Interpreter(env)
        app = PortDispatch(
            {ports[1]: build_interpreter_app(self.interpreter, env)},
            build_envd_root(self.envd.app, self.interpreter),
        )
        self._server = uvicorn.Server(_server_config(app))
        self._warm: asyncio.Task[None] | None = None
        #: the signal that stopped the agent, for `run` to end the process with
        self.stop_signal: int | None = None

    @property
    def serving(self) -> bool:
        return self._server.started

    def stop(self) -> None:
        """Ask `serve()` to stop (from the loop's thread or a signal handler)."""
        self._server.should_exit = True

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve on `sockets` (default: both ports on every interface) until stopped."""
        if sockets is None:
            sockets = [_listen(port) for port in self.ports]
        self._start()
        log.info("agent starting: envd on port %d, code interpreter on port %d", *self.ports)
        try:
            with self._stop_signals():
                await self._server.serve(sockets=sockets)
        finally:
            await self._aclose()

    def _start(self) -> None:
        self._warm = asyncio.create_task(self.interpreter.start())
        self._warm.add_done_callback(_report_failed_warm)

    async def _aclose(self) -> None:
        # Each stop runs even if one before it fails.
        try:
            if self._warm is not None:
                self._warm.cancel()
                await asyncio.gather(self._warm, return_exceptions=True)
            await self.interpreter.shutdown()
        finally:
            await self.envd.aclose()
        log.info("agent stopped")

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the agent, and its services get to stop first.

        uvicorn catches both while it serves, and once it has stopped it raises the signal
        again under the handler it found. Under the default handler that would end the
        process right there, before a single service has stopped; under this one it only
        notes the signal, and `run` ends the process with it afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread can take signals; its owner stops this one
            return

        def stop(signum: int, _: FrameType | None) -> None:
            self.stop_signal = self.stop_signal or signum
            self.stop()

        previous = {signum: signal.signal(signum, stop) for signum in _STOP_SIGNALS}
        try:
            yield
        finally:
            # A second signal while the services stop ends the process without waiting.
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _server_config(app: ASGIApp) -> uvicorn.Config:
    return uvicorn.Config(
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


def run(agent: Agent, sockets: list[socket.socket] | None = None) -> None:
    """Serve until stopped. Stopped by a signal, the process then ends by that signal, as if
    it had not been caught, once every service has stopped."""
    asyncio.run(agent.serve(sockets))
    if agent.stop_signal is not None:
        signal.signal(agent.stop_signal, signal.SIG_DFL)
        signal.raise_signal(agent.stop_signal)


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
    # A VM clone's own address, clock and keys arrive over virtio-serial (no-op in a jail).
    # Not one of the agent's services: a daemon thread blocked in read(), with nothing to
    # stop, that ends with the process.
    identity.start()
    run(Agent(env))
