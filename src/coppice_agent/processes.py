"""envd's process service (`process.Process`): start commands as a sandbox user, stream their
output to any number of watchers, feed their stdin or PTY, signal their process group.

A process outlives the request that started it: closing a stream only drops that watcher, and
`Connect` attaches a new one. Every process leads its own session, so a signal reaches the
whole tree it spawned (`sh -c 'sleep 100 & sleep 100'` dies as one)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeAlias

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from coppice_agent.environment import SandboxEnvironment
from coppice_agent.paths import acting_user, resolve_path
from coppice_agent.rpc.process.process_connect import Process
from coppice_agent.rpc.process.process_pb import (
    PTY,
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
from coppice_agent.users import SandboxUser, UnknownUser, user_from_basic_auth

DEFAULT_KEEPALIVE_INTERVAL = 30.0
_READ_SIZE = 64 * 1024
# After the leader exits, how long to keep reading output its children may still be flushing.
# Descendants that keep the pipes open (`sleep 100 &`) must not hold the end event back.
_DRAIN_GRACE = 0.2
_SIGNALS = {Signal.SIGTERM: signal.SIGTERM, Signal.SIGKILL: signal.SIGKILL}

Ctx: TypeAlias = RequestContext[Any, Any]


class ManagedProcess:
    """One started process: its pipes or PTY, its watchers, and the task that reaps it."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        config: ProcessConfig,
        tag: str | None,
        *,
        outputs: dict[str, int],
        stdin_fd: int | None,
        pty_master: int | None,
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.config = config
        self.tag = tag
        self.pty_master = pty_master
        self._outputs = outputs
        self._stdin_fd = stdin_fd
        self._watchers: set[asyncio.Queue[ProcessEvent]] = set()
        self._input_lock = asyncio.Lock()
        self._kill_timer: asyncio.TimerHandle | None = None
        self.ended = asyncio.Event()
        # Set when the Start deadline killed it: that stream reports the deadline, not an exit.
        self.timed_out = False

    def kill_at(self, deadline: float) -> None:
        """SIGKILL the tree at `deadline` (event-loop time) unless it has ended by then."""
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_at(deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self.timed_out = True
        self.kill_group(signal.SIGKILL)

    def watch(self) -> asyncio.Queue[ProcessEvent]:
        queue: asyncio.Queue[ProcessEvent] = asyncio.Queue()
        self._watchers.add(queue)
        return queue

    def unwatch(self, queue: asyncio.Queue[ProcessEvent]) -> None:
        self._watchers.discard(queue)

    def _publish(self, event: ProcessEvent) -> None:
        for queue in self._watchers:
            queue.put_nowait(event)

    async def run(self) -> None:
        """Pump output until the process has exited and its output is drained, then publish
        the end event. Runs as a task for the lifetime of the process."""
        pumps = [asyncio.create_task(self._pump(fd, field)) for field, fd in self._outputs.items()]
        try:
            returncode = await _wait_exit(self.popen)
            if pumps:
                await asyncio.wait(pumps, timeout=_DRAIN_GRACE)
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for field, fd in self._outputs.items():
                self._drain_now(fd, field)
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            for fd in self._outputs.values():
                os.close(fd)
            self._close_stdin_fd()
        self._publish(_end_event(returncode))
        self.ended.set()

    async def _pump(self, fd: int, field: str) -> None:
        while True:
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                await _ready(fd, writable=False)
                continue
            except OSError as exc:
                # A PTY master reads EIO once the last slave descriptor is closed.
                if exc.errno == errno.EIO:
                    return
                raise
            if not chunk:
                return
            self._publish(_data_event(field, chunk))

    def _drain_now(self, fd: int, field: str) -> None:
        while True:
            try:
                chunk = os.read(fd, _READ_SIZE)
            except OSError:
                return
            if not chunk:
                return
            self._publish(_data_event(field, chunk))

    async def write_input(self, data: bytes) -> None:
        fd = self.pty_master if self.pty_master is not None else self._stdin_fd
        if fd is None:
            raise ConnectError(
                Code.FAILED_PRECONDITION, f"process {self.pid} was started without stdin"
            )
        async with self._input_lock:
            view = memoryview(data)
            while view:
                try:
                    written = os.write(fd, view)
                except BlockingIOError:
                    await _ready(fd, writable=True)
                    continue
                except OSError as exc:
                    raise ConnectError(
                        Code.FAILED_PRECONDITION,
                        f"cannot write to process {self.pid}: {exc.strerror}",
                    ) from None
                view = view[written:]

    async def close_stdin(self) -> None:
        if self.pty_master is not None:
            raise ConnectError(
                Code.FAILED_PRECONDITION,
                f"process {self.pid} uses a PTY; send the EOF character (^D) instead",
            )
        async with self._input_lock:
            self._close_stdin_fd()

    def _close_stdin_fd(self) -> None:
        if self._stdin_fd is not None:
            os.close(self._stdin_fd)
            self._stdin_fd = None

    def resize(self, size: PTY.Size) -> None:
        if self.pty_master is None:
            raise ConnectError(Code.FAILED_PRECONDITION, f"process {self.pid} has no PTY")
        _set_winsize(self.pty_master, size)

    def kill_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            # The leader may have left its group (setsid in a child); signal it alone then.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


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
        self._processes: dict[int, ManagedProcess] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        """Kill every process tree still running and wait until they are reaped."""
        for proc in list(self._processes.values()):
            proc.kill_group(signal.SIGKILL)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

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
        queue = proc.watch()
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
        proc: ManagedProcess | None = None
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

    def _select(self, selector: ProcessSelector | None) -> ManagedProcess:
        choice = selector.selector if selector is not None else None
        if choice is None:
            raise ConnectError(Code.INVALID_ARGUMENT, "a process selector (pid or tag) is required")
        if choice.field == "pid":
            proc = self._processes.get(choice.value)
            if proc is not None and not proc.ended.is_set():
                return proc
            raise ConnectError(Code.NOT_FOUND, f"process with pid {choice.value} not found")
        for proc in self._processes.values():
            if proc.tag == choice.value and not proc.ended.is_set():
                return proc
        raise ConnectError(Code.NOT_FOUND, f"process with tag {choice.value!r} not found")

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(
        self, request: StartRequest, ctx: Ctx
    ) -> tuple[ManagedProcess, asyncio.Queue[ProcessEvent]]:
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        user = await _request_user(self._env, ctx)
        env = {**user.base_env(), **self._env.env_vars, **dict(config.envs)}
        if request.pty is not None:
            env.setdefault("TERM", "xterm-256color")
        cwd = resolve_path(config.cwd or self._env.default_workdir or user.home, user)
        if not await asyncio.to_thread(os.path.isdir, cwd):
            if config.cwd:
                raise ConnectError(Code.INVALID_ARGUMENT, f"cwd {cwd!r} does not exist")
            # Only an explicit cwd must exist; accounts like nobody have no home.
            cwd = "/"
        spec = _SpawnSpec([config.cmd, *config.args], env, cwd, user, request)
        try:
            proc = await asyncio.to_thread(spec.spawn)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"cannot start {config.cmd!r}: {exc.strerror}"
            ) from None
        except OSError as exc:
            raise ConnectError(Code.INTERNAL, f"cannot start {config.cmd!r}: {exc}") from None
        # Watch before the pumps run so the starting stream sees the very first byte.
        queue = proc.watch()
        self._processes[proc.pid] = proc
        self._keep(asyncio.create_task(self._supervise(proc)))
        return proc, queue

    async def _supervise(self, proc: ManagedProcess) -> None:
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
        proc: ManagedProcess,
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
            yield _start_event(proc.pid)
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
                        yield _keepalive_event()
                    continue
                event = getter.result()
                getter = None
                if event.event is not None and event.event.field == "end":
                    if started_it and proc.timed_out:
                        # The kill timer beat this loop's own check to the deadline.
                        raise _deadline_exceeded()
                    yield event
                    return
                yield event
        finally:
            if getter is not None:
                getter.cancel()
            proc.unwatch(queue)


class _SpawnSpec:
    """Everything `Popen` needs; `spawn` runs in a worker thread since fork/exec blocks."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        user: SandboxUser,
        request: StartRequest,
    ) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.user = user
        self.pty = request.pty
        # SDKs before `stdin` existed expected a writable stdin on every process.
        self.with_stdin = request.stdin if request.has_field("stdin") else True
        self.config = request.process or ProcessConfig()
        self.tag = request.tag if request.has_field("tag") else None

    def spawn(self) -> ManagedProcess:
        if self.pty is not None:
            return self._spawn_pty()
        return self._spawn_pipes()

    def _identity(self) -> dict[str, Any]:
        if self.user.is_current:
            return {}
        return {
            "user": self.user.uid,
            "group": self.user.gid,
            "extra_groups": list(self.user.groups),
        }

    def _spawn_pipes(self) -> ManagedProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if self.with_stdin else (subprocess.DEVNULL, -1)
        child_ends = [out_w, err_w] + ([in_r] if self.with_stdin else [])
        parent_ends = [out_r, err_r] + ([in_w] if self.with_stdin else [])
        try:
            popen = subprocess.Popen(
                self.argv,
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
                **self._identity(),
            )
        except BaseException:
            for fd in child_ends + parent_ends:
                os.close(fd)
            raise
        for fd in child_ends:
            os.close(fd)
        for fd in parent_ends:
            os.set_blocking(fd, False)
        return ManagedProcess(
            popen,
            self.config,
            self.tag,
            outputs={"stdout": out_r, "stderr": err_r},
            stdin_fd=in_w if self.with_stdin else None,
            pty_master=None,
        )

    def _spawn_pty(self) -> ManagedProcess:
        master, slave = os.openpty()
        try:
            if self.pty is not None and self.pty.size is not None:
                _set_winsize(master, self.pty.size)
            if not self.user.is_current:
                os.fchown(slave, self.user.uid, -1)
            popen = subprocess.Popen(
                self.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
                preexec_fn=_take_controlling_terminal,
                **self._identity(),
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        return ManagedProcess(
            popen,
            self.config,
            self.tag,
            outputs={"pty": master},
            stdin_fd=None,
            pty_master=master,
        )


def _take_controlling_terminal() -> None:
    # Runs in the child after setsid(): make the PTY on fd 0 the session's terminal, so job
    # control, ^C and SIGWINCH on resize reach the shell.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_winsize(fd: int, size: PTY.Size) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


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


async def _ready(fd: int, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _wait_exit(popen: subprocess.Popen[bytes]) -> int:
    """Wait for the exit without a blocked thread (pidfd), and reap it."""
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        return await _wait_exit_in_thread(popen)
    try:
        await _ready(pidfd, writable=False)
    finally:
        os.close(pidfd)
    returncode = popen.poll()
    if returncode is None:
        # pidfd readable means exited; a racing reaper elsewhere would make poll() see ECHILD.
        returncode = popen.wait()
    return returncode


async def _wait_exit_in_thread(popen: subprocess.Popen[bytes]) -> int:
    # Kernels without pidfd_open: a dedicated thread, so long-lived processes cannot starve
    # the shared default executor.
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def wait() -> None:
        code = popen.wait()
        loop.call_soon_threadsafe(_settle, done, code)

    threading.Thread(target=wait, name=f"wait-{popen.pid}", daemon=True).start()
    return await done


def _settle(future: asyncio.Future[int], value: int) -> None:
    if not future.done():
        future.set_result(value)


def _start_event(pid: int) -> ProcessEvent:
    start: Oneof[Literal["start"], ProcessEvent.StartEvent] = Oneof(
        "start", ProcessEvent.StartEvent(pid=pid)
    )
    return ProcessEvent(event=start)


def _keepalive_event() -> ProcessEvent:
    keepalive: Oneof[Literal["keepalive"], ProcessEvent.KeepAlive] = Oneof(
        "keepalive", ProcessEvent.KeepAlive()
    )
    return ProcessEvent(event=keepalive)


def _input_bytes(data: ProcessInput | None) -> bytes:
    if data is None or data.input is None:
        return b""
    return data.input.value


def _data_event(field: str, chunk: bytes) -> ProcessEvent:
    return ProcessEvent(
        event=Oneof("data", ProcessEvent.DataEvent(output=Oneof(field, chunk)))  # type: ignore[arg-type]
    )


def _end_event(returncode: int) -> ProcessEvent:
    """Shaped like Go's os.ProcessState, which is what envd reports."""
    if returncode >= 0:
        status = f"exit status {returncode}"
        end = ProcessEvent.EndEvent(
            exit_code=returncode,
            exited=True,
            status=status,
            error=status if returncode else None,
        )
    else:
        status = f"signal: {_signal_text(-returncode)}"
        end = ProcessEvent.EndEvent(exit_code=-1, exited=False, status=status, error=status)
    choice: Oneof[Literal["end"], ProcessEvent.EndEvent] = Oneof("end", end)
    return ProcessEvent(event=choice)


def _signal_text(signum: int) -> str:
    text = signal.strsignal(signum)
    if not text:
        return f"signal {signum}"
    return text[0].lower() + text[1:]
