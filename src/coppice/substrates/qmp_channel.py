"""A blocking QMP connection to one QEMU process, built on the `qemu.qmp` client.

`qemu.qmp.legacy.QEMUMonitorProtocol` drives the thread's shared event loop, so one such
connection used from two threads (the pool warms from a thread pool and checks out from
others) would collide. Each channel here owns a private event loop and a lock instead, which
lets the driver keep a channel per entry and use it from any thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from coppice.errors import SubstrateError


class QmpChannel:
    def __init__(self, socket_path: Path, name: str = "") -> None:
        self.socket_path = socket_path
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name or socket_path.parent.name)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(cls, socket_path: Path, timeout_s: float = 10.0, name: str = "") -> QmpChannel:
        """Connect, retrying while QEMU is still creating its socket."""
        channel = cls(socket_path, name)
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while True:
            try:
                channel._run(channel._client.connect(str(socket_path)), timeout_s)
                return channel
            except (TimeoutError, ConnectError, OSError) as exc:
                if time.monotonic() > deadline:
                    channel.close()
                    raise SubstrateError(
                        f"cannot reach QEMU's monitor at {socket_path}: {exc}"
                    ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout_s: float = 10.0
    ) -> Any:
        with self._lock:
            if self._closed:
                raise SubstrateError(f"QMP channel {self.socket_path} is closed")
            try:
                result = self._run(self._client.execute(command, arguments), timeout_s)
            except ExecuteError as exc:
                raise SubstrateError(f"QEMU refused {command}: {exc}") from exc
            except (TimeoutError, QMPError, OSError, EOFError) as exc:
                raise SubstrateError(f"QMP {command} failed: {exc!r}") from exc
            # Events (STOP, RESUME, MIGRATION, ...) are never read; drop them so that a
            # long-lived channel does not accumulate them.
            self._client.events.clear()
            return result

    def pass_file(self, name: str, fd: int) -> None:
        """Hand QEMU an open file under `name` (`fd:<name>` in a migration URI): QEMU then
        reads or writes the file itself, with no `cat` process and pipe in between, which
        took three times as long for a guest's memory. The caller keeps (and closes) `fd`."""
        with self._lock:
            if self._closed:
                raise SubstrateError(f"QMP channel {self.socket_path} is closed")
            try:
                self._client.send_fd_scm(fd)
            except (QMPError, OSError) as exc:
                raise SubstrateError(f"cannot pass a file to QEMU: {exc!r}") from exc
        self.execute("getfd", {"fdname": name})

    @property
    def is_open(self) -> bool:
        return not self._closed and self._client.runstate.name == "RUNNING"

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._run(self._client.disconnect(), 5.0)
            except (TimeoutError, QMPError, OSError, EOFError):
                pass  # the process is gone or going; nothing left to say to it
            finally:
                self._loop.close()

    def _run(self, coro: Any, timeout_s: float) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout_s))
