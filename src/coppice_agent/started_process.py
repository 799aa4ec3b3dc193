"""One started process for as long as it runs: its output read into its event broadcast, its
stdin or PTY written, its tree signalled, its exit reaped, its Start deadline kept."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import threading

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coppice_agent.process_events import EventBroadcast, data_event, end_event
from coppice_agent.readiness import readable, writable
from coppice_agent.rpc.process.process_pb import PTY, ProcessConfig
from coppice_agent.spawn import Child, set_winsize

_READ_SIZE = 64 * 1024
# After the leader exits, how long to keep reading output its children may still be flushing.
# Descendants that keep the pipes open (`sleep 100 &`) must not hold the end event back.
_DRAIN_GRACE = 0.2


class StartedProcess:
    """`run()` is the process's supervisor task: it pumps output until the process has exited
    and its output is drained, then publishes the end event."""

    def __init__(self, child: Child, config: ProcessConfig, tag: str | None) -> None:
        self.popen = child.popen
        self.pid = child.popen.pid
        self.config = config
        self.tag = tag
        self.pty_master = child.pty_master
        self.events = EventBroadcast()
        self._outputs = child.outputs
        self._stdin_fd = child.stdin
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

    async def run(self) -> None:
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
        self.events.publish(end_event(returncode))
        self.ended.set()

    async def _pump(self, fd: int, field: str) -> None:
        while True:
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                await readable(fd)
                continue
            except OSError as exc:
                # A PTY master reads EIO once the last slave descriptor is closed.
                if exc.errno == errno.EIO:
                    return
                raise
            if not chunk:
                return
            self.events.publish(data_event(field, chunk))

    def _drain_now(self, fd: int, field: str) -> None:
        while True:
            try:
                chunk = os.read(fd, _READ_SIZE)
            except OSError:
                return
            if not chunk:
                return
            self.events.publish(data_event(field, chunk))

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
                    await writable(fd)
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
        set_winsize(self.pty_master, size)

    def kill_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            # No group of that id: the leader has left its group (setsid in a child), or has
            # not made it yet (setsid(1) between exec and setsid()); signal it alone then.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


async def _wait_exit(popen: subprocess.Popen[bytes]) -> int:
    """Wait for the exit without a blocked thread (pidfd), and reap it."""
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        return await _wait_exit_in_thread(popen)
    try:
        await readable(pidfd)
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
