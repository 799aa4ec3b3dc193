"""The agent process: envd on 49983 and the code interpreter on 49999, one event loop and one
uvicorn server listening on both sockets (the port a request arrived on picks the app).

Start-up order matters for the warm pool: the pool pauses an entry as soon as `/ready`
answers, so `/ready` waits for the default kernel to be warm and for the template's ready
command to pass (`template_start`), and the first call after checkout finds both running.
`/ready` answers 204 then, 503 while waiting, and 500 with the reason once the template's
start has failed (the host stops waiting on that).
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
from collections.abc import Iterator, Mapping
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from coppice_agent import identity, template_config
from coppice_agent.envd import Envd
from coppice_agent.environment import SandboxEnvironment
from coppice_agent.interpreter import Interpreter, build_interpreter_app
from coppice_agent.sudo_broker import DEFAULT_SOCKET, serve_sudo
from coppice_agent.template_config import TemplateConfig
from coppice_agent.template_start import TemplateStartup

log = logging.getLogger("coppice_agent")

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def build_envd_root(envd: ASGIApp, interpreter: Interpreter, startup: TemplateStartup) -> Starlette:
    async def ready(_: Request) -> Response:
        if startup.failure is not None:
            return JSONResponse({"code": 500, "message": startup.failure}, status_code=500)
        waiting = []
        if not interpreter.is_ready:
            waiting.append("the default kernel is still starting")
        if not startup.passed:
            waiting.append(startup.waiting_for())
        if waiting:
            return JSONResponse({"code": 503, "message": "; ".join(waiting)}, status_code=503)
        return Response(status_code=204)

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
    running), the code interpreter (whose start warms the default kernel in the background,
    and whose stop shuts every kernel down) and the template's start (whose start runs the
    start command as one of envd's processes and waits for the ready command, in the
    background; its stop ends a ready check still running).

    `env` carries the template's user, workdir and env vars already (`environment_for`);
    `template` gives the start and ready commands."""

    def __init__(
        self,
        env: SandboxEnvironment,
        *,
        ports: tuple[int, int] = (ENVD_PORT, INTERPRETER_PORT),
        interpreter: Interpreter | None = None,
        template: TemplateConfig | None = None,
        sudo_socket: str | None = None,
    ) -> None:
        """`sudo_socket`: where the sudo broker listens (None: no broker; tests run the
        agent as the host's root, where that socket would be the host's)."""
        self.ports = ports
        self._sudo_socket = sudo_socket
        self._sudo: asyncio.Task[None] | None = None
        self.envd = Envd(env)
        self.interpreter = interpreter or Interpreter(env)
        self.startup = TemplateStartup(template or TemplateConfig(), env, self.envd.processes)
        self._warm_kernel = (template or TemplateConfig()).warm_kernel
        app = PortDispatch(
            {ports[1]: build_interpreter_app(self.interpreter, env)},
            build_envd_root(self.envd.app, self.interpreter, self.startup),
        )
        self._server = uvicorn.Server(_server_config(app))
        self._warm: asyncio.Task[None] | None = None
        self._template_start: asyncio.Task[None] | None = None
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
        self._warm = asyncio.create_task(self.interpreter.start(self._warm_kernel))
        self._warm.add_done_callback(_report_failed_warm)
        # Reports its own failures (`TemplateStartup.failure`, and the log).
        self._template_start = asyncio.create_task(self.startup.run())
        if self._sudo_socket is not None:
            # bwrap's no_new_privs stops setuid sudo in a jail; the broker stands in for it.
            self._sudo = asyncio.create_task(serve_sudo(self._sudo_socket))

    async def _aclose(self) -> None:
        # Each stop runs even if one before it fails.
        try:
            tasks = (self._warm, self._template_start, self._sudo)
            started = [task for task in tasks if task is not None]
            for task in started:
                task.cancel()
            await asyncio.gather(*started, return_exceptions=True)
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


def environment_for(template: TemplateConfig, environ: Mapping[str, str]) -> SandboxEnvironment:
    """The sandbox's defaults before /init: the template's user (unless the agent was told
    another), workdir and env vars."""
    return SandboxEnvironment(
        default_user=environ.get("COPPICE_DEFAULT_USER") or template.user,
        default_workdir=template.workdir,
        template_envs=dict(template.envs),
    )


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
    template = template_config.load(template_config.config_path())
    env = environment_for(template, os.environ)
    # A VM clone's own address, clock and keys arrive over virtio-serial (no-op in a jail).
    # Not one of the agent's services: a daemon thread blocked in read(), with nothing to
    # stop, that ends with the process.
    identity.start(on_applied=env.forget_sandbox)
    run(Agent(env, template=template, sudo_socket=DEFAULT_SOCKET))
