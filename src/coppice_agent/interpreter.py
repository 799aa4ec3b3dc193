"""The code-interpreter half of the agent (E2B logical port 49999): Jupyter kernels behind
`/execute` and `/contexts`, as `e2b_code_interpreter` expects them (wire spec §3)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq.asyncio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from coppice_agent.environment import SandboxEnvironment
from coppice_agent.executions import Execution
from coppice_agent.kernel_specs import (
    PYTHON,
    KernelCatalog,
    LanguageKernel,
    UnknownLanguage,
    canonical_language,
    resolve_language,
)
from coppice_agent.kernels import DEFAULT_KERNEL_ARGV, Kernel, KernelDied, KernelLaunch
from coppice_agent.paths import default_cwd
from coppice_agent.users import SandboxUser, UnknownUser

log = logging.getLogger(__name__)

#: tries per kernel start, sharing the start-up timeout
STARTUP_ATTEMPTS = 2


class ContextNotFound(LookupError):
    pass


class BadContextRequest(ValueError):
    """The request names something we cannot provide: another language, a missing cwd."""


@dataclass
class CodeContext:
    id: str
    language: str
    cwd: str
    kernel: Kernel
    # Named by nobody: the sandbox's default cwd (the template's workdir, else the default
    # user's home), followed anew when /init changes the default user.
    cwd_is_default: bool
    #: the kernelspec the context's kernels start from; None: the agent's own Python kernel
    spec: LanguageKernel | None = None

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


class Interpreter:
    """Owns the sandbox's kernels. `start()` warms the default python context; the agent
    calls it before the sandbox is paused in the warm pool."""

    def __init__(
        self,
        env: SandboxEnvironment,
        *,
        kernel_argv: Sequence[str] = DEFAULT_KERNEL_ARGV,
        runtime_dir: str | None = None,
        startup_timeout: float = 60.0,
        kernels: KernelCatalog | None = None,
    ) -> None:
        """`kernel_argv`: the Python kernel; `kernels`: where the other languages' come from."""
        self._env = env
        self._kernel_argv = tuple(kernel_argv)
        self._kernels = kernels or KernelCatalog()
        self._runtime_dir_request = runtime_dir
        self._runtime_dir: str | None = None
        self._startup_timeout = startup_timeout
        self._zmq: zmq.asyncio.Context | None = None
        self._contexts: dict[str, CodeContext] = {}
        # Per language, the context that `/execute` without a context_id runs in (E2B's
        # default contexts); Python's is started before the sandbox is frozen.
        self._default_ids: dict[str, str] = {}
        # Serializes starting the default context, /init and shutdown against each other.
        self._lifecycle = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = asyncio.Event()
        #: why run_code cannot work here (no ipykernel in the image), once start() knows
        self.missing_kernel: str | None = None
        #: the default kernel starts on first use, not at warm
        self._lazy = False
        self._probed = False
        env.on_init(self._on_env_init)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, warm: bool = True) -> None:
        """Warm the default Python context (`warm`), or leave it to the first run_code: a
        template whose users run commands only then costs no kernel at all."""
        self._prepare_runtime_dir()
        if not warm:
            self._lazy = True
            self._started.set()
            return
        self.missing_kernel = await self._python_kernel_missing()
        if self.missing_kernel is not None:
            # Commands and files still work: a template of any image is a sandbox, and only
            # its run_code calls fail, saying what to install.
            log.warning("%s; run_code will answer with this", self.missing_kernel)
        else:
            await self.default_context()
        self._started.set()

    async def _python_kernel_missing(self) -> str | None:
        """Why this image cannot run the default Python kernel, or None if it can."""
        try:
            home = self._env.user().home
        except UnknownUser:
            home = None
        if PYTHON in self._kernels.kernels(home):
            return None
        probe = await asyncio.create_subprocess_exec(
            self._kernel_argv[0], "-c", "import ipykernel_launcher",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        if await probe.wait() == 0:
            return None
        return (
            f"this sandbox's {self._kernel_argv[0]} has no ipykernel, so it has no Python "
            "kernel for run_code; install it in the template (pip install ipykernel, or "
            "apt-get install python3-ipykernel)"
        )

    @property
    def is_ready(self) -> bool:
        """True once the default context's kernel is up, connected and warmed up (or the
        image has no Python kernel to start)."""
        if self.missing_kernel is not None or self._lazy:
            return True
        ctx = self._contexts.get(self._default_ids.get(PYTHON, ""))
        return ctx is not None and ctx.kernel.usable

    async def ready(self) -> None:
        """Returns once `start()` has finished."""
        await self._started.wait()

    async def shutdown(self) -> None:
        async with self._lifecycle:
            contexts = list(self._contexts.values())
            self._contexts.clear()
            self._default_ids.clear()
            await asyncio.gather(*(ctx.kernel.shutdown() for ctx in contexts))
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._zmq is not None:
                self._zmq.destroy(linger=0)
                self._zmq = None
            if self._runtime_dir is not None and self._runtime_dir_request is None:
                shutil.rmtree(self._runtime_dir, ignore_errors=True)
                self._runtime_dir = None

    def _prepare_runtime_dir(self) -> None:
        if self._runtime_dir is not None:
            return
        if self._runtime_dir_request is None:
            path = tempfile.mkdtemp(prefix="coppice-jupyter-")
        else:
            path = self._runtime_dir_request
            Path(path).mkdir(parents=True, exist_ok=True)
        # Each kernel's own directory below is private to its user; they only need to pass.
        os.chmod(path, 0o711)  # noqa: S103
        self._runtime_dir = path
        # jupyter_core falls back to paths under $HOME for anything not configured, and root's
        # home need not be writable in a sandbox.
        os.environ.setdefault("JUPYTER_RUNTIME_DIR", path)
        os.environ.setdefault("JUPYTER_DATA_DIR", os.path.join(path, "data"))
        os.environ.setdefault("JUPYTER_CONFIG_DIR", os.path.join(path, "config"))
        os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")

    # -- contexts ---------------------------------------------------------------------------

    async def default_context(self, language: str | None = None) -> CodeContext:
        """The context of `language` (Python when None) that has no id in the request,
        started on first use."""
        key = PYTHON if language is None else canonical_language(language)
        ctx = self._contexts.get(self._default_ids.get(key, ""))
        if ctx is not None:
            return ctx
        name, spec = self._resolve(language)
        async with self._lifecycle:
            ctx = self._contexts.get(self._default_ids.get(name, ""))
            if ctx is None:
                ctx = await self._new_context(None, name, spec)
                self._default_ids[name] = ctx.id
            return ctx

    async def create_context(
        self, *, cwd: str | None = None, language: str | None = None
    ) -> CodeContext:
        return await self._new_context(cwd, *self._resolve(language))

    def check_language(self, ctx: CodeContext, language: str | None) -> None:
        """Refuses a request that names a language other than its context's."""
        if language is not None and canonical_language(language) != ctx.language:
            raise BadContextRequest(f"context {ctx.id!r} runs {ctx.language}, not {language}")

    def _resolve(self, language: str | None) -> tuple[str, LanguageKernel | None]:
        try:
            home = self._env.user().home
        except UnknownUser:
            home = None
        try:
            return resolve_language(self._kernels, language, home)
        except UnknownLanguage as exc:
            raise BadContextRequest(str(exc)) from None

    def list_contexts(self) -> list[CodeContext]:
        return list(self._contexts.values())

    def get_context(self, context_id: str) -> CodeContext:
        try:
            return self._contexts[context_id]
        except KeyError:
            raise ContextNotFound(f"context {context_id!r} not found") from None

    async def remove_context(self, context_id: str) -> None:
        ctx = self._contexts.pop(context_id, None)
        if ctx is None:
            raise ContextNotFound(f"context {context_id!r} not found")
        for language, default_id in list(self._default_ids.items()):
            if default_id == context_id:
                del self._default_ids[language]
        await ctx.kernel.shutdown()

    async def restart_context(self, context_id: str) -> None:
        await self._replace_kernel(self.get_context(context_id))

    async def _new_context(
        self, cwd: str | None, language: str, spec: LanguageKernel | None
    ) -> CodeContext:
        if language == PYTHON and spec is None and self._lazy and not self._probed:
            # A lazy template looks for ipykernel only now, on its first run_code.
            self._probed = True
            self.missing_kernel = await self._python_kernel_missing()
        if language == PYTHON and spec is None and self.missing_kernel is not None:
            raise BadContextRequest(self.missing_kernel)
        user = self._user()
        workdir = cwd if cwd is not None else default_cwd(self._env, user)
        if not Path(workdir).is_dir():
            raise BadContextRequest(f"cwd {workdir!r} is not a directory")
        kernel = await self._launch(user, workdir, spec)
        ctx = CodeContext(
            id=uuid.uuid4().hex,
            language=language,
            cwd=workdir,
            kernel=kernel,
            cwd_is_default=cwd is None,
            spec=spec,
        )
        self._contexts[ctx.id] = ctx
        return ctx

    async def _replace_kernel(self, ctx: CodeContext) -> None:
        user = self._user()
        cwd = default_cwd(self._env, user) if ctx.cwd_is_default else ctx.cwd
        new = await self._launch(user, cwd, ctx.spec)
        if self._contexts.get(ctx.id) is not ctx:
            await new.shutdown()  # removed while the new kernel was starting
            raise ContextNotFound(f"context {ctx.id!r} not found")
        # Swapped only now, so two restarts racing each other cannot strand a kernel.
        old, ctx.kernel, ctx.cwd = ctx.kernel, new, cwd
        await old.shutdown()

    async def _launch(self, user: SandboxUser, cwd: str, spec: LanguageKernel | None) -> Kernel:
        self._prepare_runtime_dir()
        assert self._runtime_dir is not None
        if self._zmq is None:
            self._zmq = zmq.asyncio.Context()
        launch = KernelLaunch(
            argv=self._kernel_argv,
            user=user,
            cwd=cwd,
            env=self._kernel_env(user),
            spec=spec,
        )
        # A kernel start on a loaded host has been seen to hang for good (no handshake);
        # a second, fresh start then succeeds. Two tries fit inside the SDK's 60 s request.
        for attempt in range(STARTUP_ATTEMPTS):
            try:
                return await Kernel.start(
                    launch,
                    runtime_dir=self._runtime_dir,
                    zmq_context=self._zmq,
                    timeout=self._startup_timeout / STARTUP_ATTEMPTS,
                )
            except TimeoutError:
                if attempt + 1 == STARTUP_ATTEMPTS:
                    raise
                log.warning("kernel start timed out; starting a fresh one")
        raise AssertionError("unreachable")

    def _user(self) -> SandboxUser:
        try:
            return self._env.user()
        except UnknownUser as exc:
            raise BadContextRequest(str(exc)) from None

    def _kernel_env(self, user: SandboxUser) -> dict[str, str]:
        # Built from scratch: the agent's own environment (its private site dir, isolated
        # mode) must not leak into the user's interpreter.
        return self._env.process_env(user)

    async def _on_env_init(self, env: SandboxEnvironment) -> None:
        """After checkout: kernels started in the warm pool get the sandbox's env vars, and
        run as the default user /init named."""
        async with self._lifecycle:
            try:
                user = env.user()
            except UnknownUser:
                log.warning("default user %r unknown; kernels keep their user", env.default_user)
                user = None
            contexts = list(self._contexts.values())
            await asyncio.gather(*(self._refresh(ctx, user) for ctx in contexts))

    async def _refresh(self, ctx: CodeContext, user: SandboxUser | None) -> None:
        if user is not None and user != ctx.kernel.user:
            await self._replace_kernel(ctx)
        else:
            await ctx.kernel.update_environment(self._kernel_env(ctx.kernel.user))

    # -- executions -------------------------------------------------------------------------

    def execute(self, ctx: CodeContext, code: str, env_vars: Mapping[str, str] | None) -> Execution:
        """Start running `code` in `ctx` (after the cells already queued there)."""
        if env_vars and not ctx.kernel.can_set_env:
            # Refused rather than ignored: the code would run without the variables it asked for.
            raise BadContextRequest(f"env_vars are not supported for {ctx.language} code")
        return Execution(lambda run: self._execute_in(ctx, code, env_vars, run), self._spawn)

    async def _execute_in(
        self, ctx: CodeContext, code: str, env_vars: Mapping[str, str] | None, run: Execution
    ) -> None:
        while True:
            kernel = ctx.kernel
            if kernel.dead and self._contexts.get(ctx.id) is ctx:
                # The last cell killed the interpreter (os._exit, a segfault): give the context
                # a fresh kernel, as Jupyter's auto-restart would.
                async with self._lifecycle:
                    if ctx.kernel is kernel and self._contexts.get(ctx.id) is ctx:
                        await self._replace_kernel(ctx)
                continue
            try:
                await kernel.execute(code, env_vars, run.emit, run.started)
            except KernelDied:
                # Restarted or removed while we waited for the lock: follow the context to
                # its new kernel, unless the cell itself had started.
                if run.kernel is None and ctx.kernel is not kernel:
                    continue
                raise
            return

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# -- HTTP -------------------------------------------------------------------------------------

_NDJSON = "application/x-ndjson"
# No proxy on the way should hold lines back: the SDK's on_stdout callbacks fire per line.
_STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class _BadRequest(Exception):
    pass


class _ExecutionResponse(StreamingResponse):
    """Streams an execution and notices a client that hangs up even while the cell prints
    nothing (plain StreamingResponse, on ASGI 2.4 servers, only finds out on its next write)."""

    def __init__(self, execution: Execution) -> None:
        super().__init__(execution.chunks(), media_type=_NDJSON, headers=_STREAM_HEADERS)
        self._execution = execution

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.create_task(self._watch(receive))
        try:
            await self.stream_response(send)
        except OSError:
            pass  # the client is gone; the cell has been abandoned
        finally:
            watcher.cancel()
            self._execution.abandon()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._execution.abandon()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


async def _json_object(request: Request, *, empty_ok: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip() and empty_ok:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise _BadRequest("request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _BadRequest(f"{key!r} must be a string or null")


def _env_vars(body: Mapping[str, Any]) -> dict[str, str] | None:
    value = body.get("env_vars")
    if value is None:
        return None
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return value
    raise _BadRequest("'env_vars' must map strings to strings")


def build_interpreter_app(interpreter: Interpreter, env: SandboxEnvironment) -> Starlette:
    """The port-49999 server. Starting and stopping `interpreter` is the caller's job."""

    async def execute(request: Request) -> Response:
        # The SDK sends the envd token on /execute (not on /contexts); check it like envd.
        if not env.token_ok(request.headers.get("x-access-token")):
            return _error(401, "invalid or missing X-Access-Token")
        body = await _json_object(request)
        code = body.get("code")
        if not isinstance(code, str):
            raise _BadRequest("'code' must be a string")
        context_id = _optional_str(body, "context_id")
        language = _optional_str(body, "language")
        env_vars = _env_vars(body)
        if context_id is None:
            ctx = await interpreter.default_context(language)
        else:
            ctx = interpreter.get_context(context_id)
            interpreter.check_language(ctx, language)
        return _ExecutionResponse(interpreter.execute(ctx, code, env_vars))

    async def create_context(request: Request) -> Response:
        body = await _json_object(request, empty_ok=True)
        ctx = await interpreter.create_context(
            cwd=_optional_str(body, "cwd"), language=_optional_str(body, "language")
        )
        return JSONResponse(ctx.describe())

    async def list_contexts(request: Request) -> Response:
        return JSONResponse([ctx.describe() for ctx in interpreter.list_contexts()])

    async def remove_context(request: Request) -> Response:
        await interpreter.remove_context(request.path_params["context_id"])
        return Response(status_code=204)

    async def restart_context(request: Request) -> Response:
        await interpreter.restart_context(request.path_params["context_id"])
        return Response(status_code=204)

    async def health(request: Request) -> Response:
        return Response(status_code=204)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return _error(400, str(exc))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, str(exc.args[0]) if exc.args else "not found")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail)

    return Starlette(
        routes=[
            Route("/execute", execute, methods=["POST"]),
            Route("/contexts", list_contexts, methods=["GET"]),
            Route("/contexts", create_context, methods=["POST"]),
            Route("/contexts/{context_id}", remove_context, methods=["DELETE"]),
            Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={
            _BadRequest: bad_request,
            BadContextRequest: bad_request,
            ContextNotFound: not_found,
            HTTPException: http_error,
        },
    )
