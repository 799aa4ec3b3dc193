"""One `/execute` call in flight, decoupled from the HTTP response that streams it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from coppice_agent.kernel_output import END_OF_EXECUTION, Event, encode, error_event
from coppice_agent.kernels import Kernel, KernelDied

log = logging.getLogger(__name__)

Runner = Callable[["Execution"], Coroutine[Any, Any, None]]
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Execution:
    """The cell runs in its own task and feeds a queue the response drains, so a client that
    goes away cannot cancel it halfway through the kernel bookkeeping around it."""

    def __init__(self, run: Runner, spawn: Spawn) -> None:
        self._spawn = spawn
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        # The kernel the cell got to run on; None while it still waits for its turn.
        self.kernel: Kernel | None = None
        self._finished = False
        self._task = spawn(self._run(run))

    @property
    def done(self) -> bool:
        return self._finished or self._task.done()

    def emit(self, event: Event) -> None:
        self._queue.put_nowait(encode(event))

    def started(self, kernel: Kernel) -> None:
        self.kernel = kernel

    async def _run(self, run: Runner) -> None:
        try:
            await run(self)
        except KernelDied as exc:
            self.emit(
                error_event(
                    "DeadKernelError",
                    f"{exc}: the context's state is lost, its next execution gets a new kernel",
                    "",
                )
            )
        except Exception as exc:
            log.exception("execution failed")
            self.emit(error_event(type(exc).__name__, str(exc), ""))
        self.emit(END_OF_EXECUTION)
        self._finished = True
        self._queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The NDJSON body, one chunk per burst of output: whatever is queued by the time the
        sender gets to it goes out in one write."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            parts = [item]
            ended = False
            while not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    ended = True
                    break
                parts.append(nxt)
            yield b"".join(parts)
            if ended:
                return

    def abandon(self) -> None:
        """The client went away: drop the cell if it has not started, interrupt it if it has,
        so the context is free for the next call either way."""
        if self.done:
            return
        if self.kernel is None:
            self._task.cancel()
        else:
            self._spawn(self.kernel.interrupt())
