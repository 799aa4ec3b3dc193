"""envd's process service (`process.Process`): the RPCs that start commands as a sandbox user,
stream their output to any number of followers, feed their stdin or PTY and signal them.

A process outlives the request that started it: closing a stream only stops that stream
following it, and `Connect` follows it anew. Every process leads its own session, so a signal
reaches the whole tree it spawned (`sh -c 'sleep 100 & sleep 100'` dies as one). Starting one
is `spawn`'s job, running it `started_process`'s, and handing its events to every stream
`process_events`'s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from coppice_agent.environment import SandboxEnvironment
from coppice_agent.paths import acting_user, default_cwd, resolve_path
from coppice_agent.process_events import is_end, keepalive_event, start_event
from coppice_agent.rpc.process.process_connect import Process
from coppice_agent.rpc.process.process_pb import (
    CloseStdinRequest,
    CloseStdinResponse,
    ConnectRequest,
    ConnectResponse,
    ListRequest,
    ListResponse,
    ProcessConfig,
    ProcessEvent,
    ProcessInfo,
    ProcessInput,
    ProcessSelector,
    SendInputRequest,
    SendInputResponse,
    SendSignalRequest,
    SendSignalResponse,
    Signal,
    StartRequest,
    StartResponse,
    StreamInputRequest,
    StreamInputResponse,
    UpdateRequest,
    UpdateResponse,
)
from coppice_agent.spawn import NoControllingTerminal, SpawnSpec
from coppice_agent.started_process import StartedProcess
from coppice_agent.users import SandboxUser, UnknownUser, user_from_basic_auth

DEFAULT_KEEPALIVE_INTERVAL = 30.0
_SIGNALS = {Signal.SIGTERM: signal.SIGTERM, Signal.SIGKILL: signal.SIGKILL}

Ctx: TypeAlias = RequestContext[Any, Any]


class ProcessService(Process):
    """Implements the generated `Process` protocol (async)."""

    def __init__(
        self,
        env: SandboxEnvironment,
        *,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> None:
        self._env = env
        self._keepalive_interval = keepalive_interval
        self._processes: dict[int, StartedProcess] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """Kill every process tree still running and wait until they are reaped."""
        for proc in list(self._processes.values()):
            proc.kill_group(signal.SIGKILL)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    def find(self, pid: int) -> StartedProcess | None:
        """The process `pid` while it runs, or None."""
        proc = self._processes.get(pid)
        if proc is None or proc.ended.is_set():
            return None
        return proc

    # -- RPCs -----------------------------------------------------------------------------

    async def list(self, request: ListRequest, ctx: Ctx, /) -> ListResponse:
        return ListResponse(
            processes=[
                ProcessInfo(config=proc.config, pid=proc.pid, tag=proc.tag)
                for proc in self._processes.values()
                if not proc.ended.is_set()
            ]
        )

    async def start(self, request: StartRequest, ctx: Ctx, /) -> AsyncIterator[StartResponse]:
        deadline = _deadline(ctx)
        proc, queue = await self._spawn(request, ctx)
        if deadline is not None:
            # envd ties the process to the Start deadline: commands.run(timeout=…) kills it,
            # also once nobody follows this stream any more (a background command).
            proc.kill_at(deadline)
        async for event in self._follow(proc, queue, ctx, deadline, started_it=True):
            yield StartResponse(event=event)

    async def connect(self, request: ConnectRequest, ctx: Ctx, /) -> AsyncIterator[ConnectResponse]:
        # A Connect deadline ends only this stream; the process keeps running.
        deadline = _deadline(ctx)
        proc = self._select(request.process)
        queue = proc.events.follow()
        async for event in self._follow(proc, queue, ctx, deadline, started_it=False):
            yield ConnectResponse(event=event)

    async def update(self, request: UpdateRequest, ctx: Ctx, /) -> UpdateResponse:
        proc = self._select(request.process)
        if request.pty is not None and request.pty.size is not None:
            proc.resize(request.pty.size)
        return UpdateResponse()

    async def send_input(self, request: SendInputRequest, ctx: Ctx, /) -> SendInputResponse:
        proc = self._select(request.process)
        await proc.write_input(_input_bytes(request.input))
        return SendInputResponse()

    async def stream_input(
        self, request: AsyncIterator[StreamInputRequest], ctx: Ctx, /
    ) -> StreamInputResponse:
        proc: StartedProcess | None = None
        async for message in request:
            event = message.event
            if event is None or event.field == "keepalive":
                continue
            if event.field == "start":
                proc = self._select(event.value.process)
                continue
            if proc is None:
                raise ConnectError(
                    Code.FAILED_PRECONDITION, "the first StreamInput message must be start"
                )
            await proc.write_input(_input_bytes(event.value.input))
        return StreamInputResponse()

    async def send_signal(self, request: SendSignalRequest, ctx: Ctx, /) -> SendSignalResponse:
        proc = self._select(request.process)
        signum = _SIGNALS.get(request.signal)
        if signum is None:
            raise ConnectError(Code.INVALID_ARGUMENT, f"unsupported signal {request.signal!r}")
        proc.kill_group(signum)
        return SendSignalResponse()

    async def close_stdin(self, request: CloseStdinRequest, ctx: Ctx, /) -> CloseStdinResponse:
        proc = self._select(request.process)
        await proc.close_stdin()
        return CloseStdinResponse()

    # -- helpers --------------------------------------------------------------------------

    def _select(self, selector: ProcessSelector | None) -> StartedProcess:
        choice = selector.selector if selector is not None else None
        if choice is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "a process selector (pid or tag) is required")
        if choice.field == "pid":
            proc = self.find(choice.value)
            if proc is not None:
                return proc
            raise ConnectError(Code.NOT_FOUND, f"process with pid {choice.value} not found")
        for proc in self._processes.values():
            if proc.tag == choice.value and not proc.ended.is_set():
                return proc
        raise ConnectError(Code.NOT_FOUND, f"process with tag {choice.value!r} not found")

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def launch(
        self, spec: SpawnSpec, config: ProcessConfig, tag: str | None = None
    ) -> tuple[StartedProcess, asyncio.Queue[ProcessEvent]]:
        """Start `spec` as one of this service's processes: listed, connectable, signalled,
        and killed when the service stops, whoever started it (a Start request, or the
        template's start command). Returns it with a queue that has followed its events
        from the very first byte. Raises what `SpawnSpec.spawn` raises."""
        child = await asyncio.to_thread(spec.spawn)
        proc = StartedProcess(child, config, tag)
        # Follow before the pumps run so the starter sees the very first byte.
        queue = proc.events.follow()
        self._processes[proc.pid] = proc
        self._keep(asyncio.create_task(self._supervise(proc)))
        return proc, queue

    async def _spawn(
        self, request: StartRequest, ctx: Ctx
    ) -> tuple[StartedProcess, asyncio.Queue[ProcessEvent]]:
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        user = await _request_user(self._env, ctx)
        env = self._env.process_env(user, config.envs)
        if request.pty is not None:
            env.setdefault("TERM", "xterm-256color")
        if config.cwd:
            cwd = resolve_path(config.cwd, user)
            if not await asyncio.to_thread(os.path.isdir, cwd):
                raise ConnectError(Code.INVALID_ARGUMENT, f"cwd {cwd!r} does not exist")
        else:
            cwd = await asyncio.to_thread(default_cwd, self._env, user)
        spec = SpawnSpec(
            argv=[config.cmd, *config.args],
            env=env,
            cwd=cwd,
            user=user,
            pty=request.pty,
            # SDKs before `stdin` existed expected a writable stdin on every process.
            with_stdin=request.stdin if request.has_field("stdin") else True,
        )
        tag = request.tag if request.has_field("tag") else None
        try:
            return await self.launch(spec, config, tag)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"cannot start {config.cmd!r}: {exc.strerror}"
            ) from None
        except (NoControllingTerminal, OSError) as exc:
            raise ConnectError(Code.INTERNAL, f"cannot start {config.cmd!r}: {exc}") from None

    async def _supervise(self, proc: StartedProcess) -> None:
        try:
            await proc.run()
        finally:
            self._processes.pop(proc.pid, None)

    def _keepalive(self, ctx: Ctx) -> float:
        interval = self._keepalive_interval
        requested = ctx.request_headers.get("keepalive-ping-interval")
        with contextlib.suppress(ValueError, TypeError):
            if requested is not None and float(requested) > 0:
                interval = min(interval, float(requested))
        return interval

    async def _follow(
        self,
        proc: StartedProcess,
        queue: asyncio.Queue[ProcessEvent],
        ctx: Ctx,
        deadline: float | None,
        *,
        started_it: bool,
    ) -> AsyncIterator[ProcessEvent]:
        """start, then everything `queue` receives (with keepalives in between) up to end.

        At `deadline` (event-loop time) the stream ends with Connect's deadline_exceeded and
        no end event, as envd's does: the SDK raises TimeoutException for that, while an end
        event would read as the command failing on its own."""
        interval = self._keepalive(ctx)
        loop = asyncio.get_running_loop()
        getter: asyncio.Future[ProcessEvent] | None = None
        try:
            yield start_event(proc.pid)
            while True:
                wait = interval
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise _deadline_exceeded()
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=wait)
                if not done:
                    if deadline is None or loop.time() < deadline:
                        yield keepalive_event()
                    continue
                event = getter.result()
                getter = None
                if is_end(event):
                    if started_it and proc.timed_out:
                        # The kill timer beat this loop's own check to the deadline.
                        raise _deadline_exceeded()
                    yield event
                    return
                yield event
        finally:
            if getter is not None:
                getter.cancel()
            proc.events.unfollow(queue)


def _deadline(ctx: Ctx) -> float | None:
    """The request's Connect-Timeout-Ms as an event-loop time, or None without one."""
    timeout_ms = ctx.timeout_ms
    if timeout_ms is None:
        return None
    return asyncio.get_running_loop().time() + max(timeout_ms, 0) / 1000


def _deadline_exceeded() -> ConnectError:
    return ConnectError(Code.DEADLINE_EXCEEDED, "the request's deadline passed")


async def _request_user(env: SandboxEnvironment, ctx: Ctx) -> SandboxUser:
    name = user_from_basic_auth(ctx.request_headers.get("authorization"))
    try:
        return await asyncio.to_thread(acting_user, env, name)
    except UnknownUser as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from None


def _input_bytes(data: ProcessInput | None) -> bytes:
    if data is None or data.input is None:
        return b""
    return data.input.value
