"""The default Python kernel as a fork of the template's kernel zygote (coppice_agent.zygote
.kernels), where the sandbox came from a zygote: the entry's init leaves `CHANNEL` here, one
socket that gets one kernel, forked into this sandbox's own namespaces and cgroups. Every
other kernel (more contexts, restarts, other languages, a sandbox without a zygote) starts
the ordinary way.

The forked kernel is not the agent's child (its parent is outside the sandbox), so it is
watched and signalled through a pidfd rather than waited for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from coppice_agent.oom import USER_OOM_SCORE_ADJ
from coppice_agent.zygote import wire

if TYPE_CHECKING:
    from coppice_agent.kernels import KernelLaunch

#: set by a zygote-forked entry's init before the agent starts; taken by the first kernel
CHANNEL: socket.socket | None = None
REPLY_TIMEOUT_S = 30.0
#: environment variables that change how an interpreter starts up (its sys.path, flags,
#: hashing): a kernel launched with any of them cannot be a fork of one started without
STARTUP_VARIABLES = frozenset(
    {
        "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONUSERBASE",
        "PYTHONPLATLIBDIR", "PYTHONHASHSEED", "PYTHONOPTIMIZE", "PYTHONDONTWRITEBYTECODE",
        "PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONUTF8", "PYTHONIOENCODING", "PYTHONMALLOC",
        "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONVERBOSE", "PYTHONDEBUG", "PYTHONNODEBUGRANGES",
        "PYTHONINTMAXSTRDIGITS", "PYTHONPYCACHEPREFIX", "PYTHONFAULTHANDLER",
        "PYTHONTRACEMALLOC", "PYTHONPROFILEIMPORTTIME", "PYTHONLEGACYWINDOWSSTDIO",
    }
)  # fmt: skip


class KernelForkFailed(RuntimeError):
    pass


ForkKernel = Callable[[str], Awaitable["ForkedKernelProcess"]]


def forkable(launch: KernelLaunch) -> bool:
    return launch.spec is None and not STARTUP_VARIABLES & launch.env.keys()


def take_fork(launch: KernelLaunch) -> ForkKernel | None:
    """How to get this launch's kernel forked, once; None: start it the ordinary way."""
    global CHANNEL
    if CHANNEL is None or not forkable(launch):
        return None
    channel, CHANNEL = CHANNEL, None

    async def fork(connection_file: str) -> ForkedKernelProcess:
        try:
            return await _request(channel, connection_file, launch)
        finally:
            channel.close()

    return fork


async def _request(
    channel: socket.socket, connection_file: str, launch: KernelLaunch
) -> ForkedKernelProcess:
    body = {
        "connection_file": connection_file,
        "uid": launch.user.uid,
        "gid": launch.user.gid,
        "groups": list(launch.user.groups),
        "cwd": launch.cwd,
        "env": dict(launch.env),
        "oom_score_adj": USER_OOM_SCORE_ADJ,
    }
    stdio = [os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY), os.dup(2)]
    try:
        wire.send(channel, body, stdio)
    except OSError as exc:
        raise KernelForkFailed(f"the kernel zygote is gone: {exc}") from exc
    finally:
        for fd in stdio:
            os.close(fd)
    loop = asyncio.get_running_loop()
    try:
        reply = await asyncio.wait_for(
            loop.run_in_executor(None, wire.receive, channel), REPLY_TIMEOUT_S
        )
    except (TimeoutError, OSError, wire.WireError) as exc:
        raise KernelForkFailed(f"no kernel from the kernel zygote: {exc}") from exc
    if reply is None or "pid" not in reply.body:
        why = reply.body.get("error") if reply is not None else "it closed the socket"
        raise KernelForkFailed(f"the kernel zygote did not fork a kernel: {why}")
    return ForkedKernelProcess(int(reply.body["pid"]))


class ForkedKernelProcess:
    """What jupyter_client's LocalProvisioner needs of a Popen, for a process that is not
    our child. Its exit status is not ours to read: an exited kernel reports -SIGKILL."""

    stdin = stdout = stderr = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = os.pidfd_open(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(timeout=0)

    def wait(self, timeout: float | None = None) -> int | None:
        if self.returncode is None and self._pidfd is not None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if ready:
                self.returncode = -signal.SIGKILL
                os.close(self._pidfd)
                self._pidfd = None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)
