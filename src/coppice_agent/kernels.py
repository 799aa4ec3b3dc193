"""One IPython kernel process and the single client connection the agent keeps to it.

Executions on a kernel are serialized by its lock; the client channels stay connected for the
kernel's whole life so an execution costs one request on the shell socket and a read of the
iopub messages it causes, nothing more."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from queue import Empty
from typing import Any

import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager

from coppice_agent import kernel_fork
from coppice_agent.kernel_dialects import env_code
from coppice_agent.kernel_output import STR_RESULT_MIME, Event, output_event
from coppice_agent.kernel_specs import LanguageKernel
from coppice_agent.oom import USER_FORKS
from coppice_agent.users import SandboxUser

log = logging.getLogger(__name__)

DEFAULT_KERNEL_ARGV: tuple[str, ...] = (
    sys.executable,
    "-m",
    "ipykernel_launcher",
    "-f",
    "{connection_file}",
)

# How long a read waits before checking that the kernel process is still there: a dead kernel
# never sends the `idle` an execution waits for.
_LIVENESS_INTERVAL = 0.5

# Run once at start-up, before the sandbox is paused in the warm pool, so the first user
# execution after checkout does not pay for IPython's lazy imports: the display formatters of a
# cell result and the traceback machinery of an error (tens of ms on first use).
# (code, silent): a silent cell has no result to format, so the first one is not silent, and
# store_history=False keeps the execution counter at 1 for the user's first cell.
_WARM_UP: tuple[tuple[str, bool], ...] = (
    ("1 + 1", False),
    ("1 / 0", True),
)
# The non-silent warm-up left its value in `_` and `Out`; clear them the way %reset out does.
_WARM_UP_CLEANUP = "get_ipython().displayhook.flush()"

# A cell whose value is a str must answer with the string, not its repr, as E2B's does. Only
# the kernel knows the value's type, so it adds the string under its own MIME type; text/plain,
# and the repr of every value holding strings, stay as IPython prints them (a str printer for
# text/plain would reach into lists and dicts too). Leaves no names behind.
_STR_RESULT_SETUP = f"""
def _coppice_str_results():
    from IPython.core.formatters import BaseFormatter

    class StrResult(BaseFormatter):
        format_type = {STR_RESULT_MIME!r}

        def __call__(self, obj):
            # Exactly str: a subclass may have a repr of its own, and keeps it.
            return obj if type(obj) is str else None

    formatter = get_ipython().display_formatter
    formatter.formatters[StrResult.format_type] = StrResult(parent=formatter)

_coppice_str_results()
del _coppice_str_results
"""

Emit = Callable[[Event], None]


class KernelDied(RuntimeError):
    """The kernel process exited (or was shut down) while a request was waiting on it."""


@dataclass(frozen=True)
class KernelLaunch:
    argv: Sequence[str]
    user: SandboxUser
    cwd: str
    env: Mapping[str, str]
    #: an installed kernelspec to start instead of the agent's own Python kernel (`argv`)
    spec: LanguageKernel | None = None

    @property
    def language(self) -> str:
        return "python" if self.spec is None else self.spec.language


def _kernel_spec(launch: KernelLaunch) -> KernelSpec:
    if launch.spec is None:
        return KernelSpec(
            argv=list(launch.argv),
            display_name="Python 3",
            language="python",
            name="python3",
            interrupt_mode="signal",
        )
    given = launch.spec
    return KernelSpec(
        argv=list(given.argv),
        display_name=given.display_name,
        language=given.language,
        name=given.name,
        env=dict(given.env),
        resource_dir=given.resource_dir,
        interrupt_mode=given.interrupt_mode,
    )


def _connection(launch: KernelLaunch, directory: str) -> dict[str, str]:
    """ipc for our own Python kernel, so nothing else in the sandbox's network namespace can
    reach its ports. Other kernels' ZeroMQ bindings (zeromq.js, JeroMQ) build ipc addresses
    their own way, so they get tcp on loopback; their messages are signed with the key in
    the connection file, which only the kernel's user can read."""
    if launch.spec is None:
        return {"transport": "ipc", "ip": os.path.join(directory, "s")}
    return {"transport": "tcp", "ip": "127.0.0.1"}


class _SandboxKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel spec is given, not looked up in Jupyter's data dirs (the
    agent's own interpreter cannot see them), and whose connection file belongs to the user
    the kernel runs as, so the kernel can read it after dropping privileges."""

    def __init__(
        self,
        *,
        spec: KernelSpec,
        owner: SandboxUser,
        fork: kernel_fork.ForkKernel | None = None,
        **kwargs: Any,
    ) -> None:
        self._coppice_spec = spec
        self._coppice_owner = owner
        self._coppice_fork = fork
        super().__init__(**kwargs)

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        """The kernel as a fork of the template's kernel zygote when there is one for it
        (kernel_fork), else (and for every restart) started as jupyter_client does."""
        fork, self._coppice_fork = self._coppice_fork, None
        if fork is not None:
            try:
                process = await fork(self.connection_file)
            except kernel_fork.KernelForkFailed as exc:
                log.warning("%s; starting the kernel the ordinary way", exc)
            else:
                provisioner: Any = self.provisioner
                provisioner.process = process
                provisioner.pid = provisioner.pgid = process.pid
                self._reconcile_connection_info(provisioner.connection_info)
                return
        await super()._async_launch_kernel(kernel_cmd, **kw)

    @property
    def kernel_spec(self) -> KernelSpec | None:
        return self._coppice_spec

    def write_connection_file(self, **kwargs: Any) -> None:
        super().write_connection_file(**kwargs)
        if not self._coppice_owner.is_current:
            os.chown(self.connection_file, self._coppice_owner.uid, self._coppice_owner.gid)


def _popen_kwargs(launch: KernelLaunch) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "env": dict(launch.env),
        "cwd": launch.cwd,
        # ipykernel forwards everything the cell writes to fd 1/2 over iopub; what still reaches
        # the process's own stdout is its log chatter, which nobody may be reading.
        "stdout": subprocess.DEVNULL,
    }
    if not launch.user.is_current:
        kwargs["user"] = launch.user.uid
        kwargs["group"] = launch.user.gid
        # Always set, even empty: otherwise the kernel keeps the agent's supplementary groups.
        kwargs["extra_groups"] = list(launch.user.groups)
    return kwargs


def _set_env_code(values: Mapping[str, str]) -> str:
    """A cell that sets `values` in os.environ and remembers what it replaced, leaving no
    names behind in the user's namespace."""
    return (
        "(lambda o, n: (setattr(o, '_coppice_saved_env', {k: o.environ.get(k) for k in n}),"
        f" o.environ.update(n)))(__import__('os'), {dict(values)!r})"
    )


_RESTORE_ENV_CODE = (
    "(lambda o: [o.environ.pop(k, None) if v is None else o.environ.__setitem__(k, v)"
    " for k, v in o.__dict__.pop('_coppice_saved_env', {}).items()])(__import__('os'))"
)


_RESEED_CODE = "; __import__('random').seed()"


def _update_env_code(set_values: Mapping[str, str], unset: Sequence[str]) -> str:
    return (
        "(lambda e, s, u: (e.update(s), [e.pop(k, None) for k in u]))"
        f"(__import__('os').environ, {dict(set_values)!r}, {list(unset)!r})"
    )


class Kernel:
    def __init__(
        self,
        manager: _SandboxKernelManager,
        client: AsyncKernelClient,
        launch: KernelLaunch,
        directory: str,
    ) -> None:
        self._manager = manager
        self._client = client
        self._directory = directory
        self.launch = launch
        # What the kernel's os.environ holds apart from the user's own changes: the launch env,
        # then whatever sandbox-wide updates were pushed in since.
        self.environment: dict[str, str] = dict(launch.env)
        self._lock = asyncio.Lock()
        self._cell_running = False
        self._closed = False
        self.dead = False

    @property
    def user(self) -> SandboxUser:
        return self.launch.user

    @property
    def usable(self) -> bool:
        return not (self.dead or self._closed)

    @classmethod
    async def start(
        cls,
        launch: KernelLaunch,
        *,
        runtime_dir: str,
        zmq_context: zmq.asyncio.Context,
        timeout: float,
    ) -> Kernel:
        # A directory per kernel, owned by its user: it holds the connection file and the ipc
        # sockets the kernel binds (ipc rather than tcp, so nothing else in the sandbox's
        # network namespace can reach the kernel's ports).
        directory = tempfile.mkdtemp(prefix="k", dir=runtime_dir)
        if not launch.user.is_current:
            os.chown(directory, launch.user.uid, launch.user.gid)
        manager = _SandboxKernelManager(
            spec=_kernel_spec(launch),
            owner=launch.user,
            fork=kernel_fork.take_fork(launch),
            context=zmq_context,
            connection_file=os.path.join(directory, "connection.json"),
            **_connection(launch, directory),
        )
        kernel: Kernel | None = None
        try:
            # The kernel runs the user's code: it is born the OOM killer's candidate.
            with USER_FORKS.forking():
                await manager.start_kernel(**_popen_kwargs(launch))
            client = manager.client(context=zmq_context)
            # `shell` is the Jupyter shell channel, not a subprocess shell.
            client.start_channels(  # noqa: S604
                shell=True, iopub=True, stdin=False, hb=False, control=False
            )
            kernel = cls(manager, client, launch, directory)
            await asyncio.wait_for(kernel._handshake(), timeout)
            if launch.spec is None:  # Python code, for our own Python kernel only
                await asyncio.wait_for(kernel._silent(_STR_RESULT_SETUP), timeout)
                await asyncio.wait_for(kernel._warm_up(), timeout)
        except BaseException:
            if kernel is not None:
                await kernel.shutdown()
            else:
                await _discard(manager, directory)
            raise
        return kernel

    async def _handshake(self) -> None:
        """Wait until the kernel answers on shell and its iopub messages reach us: a SUB
        socket drops whatever is published before its subscription has arrived."""
        while True:
            msg_id = self._client.kernel_info()
            try:
                await self._reply(msg_id, timeout=1.0)
            except TimeoutError:
                continue
            try:
                await self._client.get_iopub_msg(timeout=0.2)
            except Empty:
                continue
            return

    async def _warm_up(self) -> None:
        for code, silent in _WARM_UP:
            msg_id = self._client.execute(
                code, silent=silent, store_history=False, allow_stdin=False, stop_on_error=False
            )
            await self._reply(msg_id)
        await self._silent(_WARM_UP_CLEANUP)

    async def execute(
        self,
        code: str,
        env_vars: Mapping[str, str] | None,
        emit: Emit,
        on_start: Callable[[Kernel], None],
    ) -> None:
        """Run one cell, emitting its output events, with `env_vars` in os.environ for this
        cell only. Waits for earlier cells on this kernel first."""
        async with self._lock:
            if not self.usable:
                raise KernelDied("kernel is no longer running")
            on_start(self)
            # The kernel handles shell requests in order, so the bookkeeping cells around the
            # user's need no round trip of their own: their replies are dropped by whichever
            # later read meets them.
            before, after = self._cell_env_code(env_vars)
            if before:
                self._send_silent(before)
            try:
                await self._run_cell(code, emit)
            finally:
                if after and self.usable:
                    self._send_silent(after)

    @property
    def can_set_env(self) -> bool:
        """Whether this kernel's language can change its environment (Java's cannot)."""
        return self.launch.spec is None or env_code(self.launch.language) is not None

    def _cell_env_code(self, env_vars: Mapping[str, str] | None) -> tuple[str | None, str | None]:
        """The cells that put `env_vars` into the kernel's environment for one cell, and that
        take them out again."""
        if not env_vars:
            return None, None
        if self.launch.spec is None:
            return _set_env_code(env_vars), _RESTORE_ENV_CODE
        code = env_code(self.launch.language)
        if code is None:
            return None, None
        # Back to what the agent knows the kernel had; Python alone remembers exactly.
        restore = {k: self.environment[k] for k in env_vars if k in self.environment}
        return code(env_vars, []), code(restore, [k for k in env_vars if k not in restore])

    def _env_update_code(self, set_values: Mapping[str, str], unset: Sequence[str]) -> str | None:
        if self.launch.spec is None:
            return _update_env_code(set_values, unset) + _RESEED_CODE
        code = env_code(self.launch.language)
        return None if code is None else code(set_values, unset)

    async def update_environment(self, target: Mapping[str, str]) -> None:
        """Bring the kernel's os.environ to `target` for every variable we manage, leaving any
        the user's own code set alone, and reseed its `random` module.

        Sent without waiting for the reply: the kernel runs shell requests in order, so every
        later cell already sees the change, and /init (on the path of every create) does not
        pay a kernel round trip. The reseed matters for VM clones, which all wake up with the
        random state of the one snapshot they were restored from.
        """
        set_values = {k: v for k, v in target.items() if self.environment.get(k) != v}
        unset = [k for k in self.environment if k not in target]
        async with self._lock:
            if not self.usable:
                return
            code = self._env_update_code(set_values, unset)
            if code is None:
                return  # the kernel keeps the environment it started with
            self._send_silent(code)
            self.environment = dict(target)

    async def interrupt(self) -> None:
        """SIGINT the running cell, if a user cell (not our own bookkeeping) is running."""
        if self._cell_running and self.usable:
            try:
                await self._manager.interrupt_kernel()
            except (RuntimeError, OSError):
                log.debug("kernel gone before it could be interrupted")

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Kill first so a cell holding the lock ends (its reads notice the dead process), then
        # close the sockets once nobody is reading them.
        try:
            await self._manager.shutdown_kernel(now=True)
        except Exception:
            log.exception("killing kernel %s failed", self._manager.kernel_id)
        async with self._lock:
            self._client.stop_channels()
        shutil.rmtree(self._directory, ignore_errors=True)

    async def _run_cell(self, code: str, emit: Emit) -> None:
        msg_id = self._client.execute(
            code, silent=False, store_history=True, allow_stdin=False, stop_on_error=False
        )
        self._cell_running = True
        try:
            while True:
                msg = await self._read(self._client.get_iopub_msg)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                msg_type = msg["msg_type"]
                content = msg["content"]
                if msg_type == "status":
                    if content.get("execution_state") == "idle":
                        break
                    continue
                event = output_event(msg_type, content)
                if event is not None:
                    emit(event)
        finally:
            self._cell_running = False
        await self._reply(msg_id, timeout=5.0)

    def _send_silent(self, code: str) -> str:
        msg_id: str = self._client.execute(
            code, silent=True, store_history=False, allow_stdin=False, stop_on_error=False
        )
        return msg_id

    async def _silent(self, code: str) -> None:
        reply = await self._reply(self._send_silent(code))
        if reply["content"].get("status") != "ok":
            log.warning("kernel bookkeeping cell failed: %s", reply["content"].get("evalue"))

    async def _reply(self, msg_id: str, *, timeout: float | None = None) -> dict[str, Any]:
        """The shell reply to `msg_id`; replies to earlier requests are dropped."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while True:
            msg = await self._read(self._client.get_shell_msg, deadline)
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    async def _read(
        self,
        get: Callable[..., Awaitable[dict[str, Any]]],
        deadline: float | None = None,
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise KernelDied("kernel was shut down")
            wait = _LIVENESS_INTERVAL
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    raise TimeoutError("the kernel did not answer in time")
            try:
                return await get(timeout=wait)
            except Empty:
                pass
            if not await self._manager.is_alive():
                self.dead = True
                raise KernelDied("kernel process exited")


async def _discard(manager: AsyncKernelManager, directory: str) -> None:
    try:
        if manager.has_kernel:
            await manager.shutdown_kernel(now=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
