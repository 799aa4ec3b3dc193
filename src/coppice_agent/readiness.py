"""Waiting, on the event loop, until a non-blocking descriptor can be read or written: how the
process service follows pipes, PTYs and pidfds without a thread per process."""

from __future__ import annotations

import asyncio


async def readable(fd: int) -> None:
    """Return once `fd` is readable (which includes end of file, a hangup or an exit)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _settle, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def writable(fd: int) -> None:
    """Return once `fd` has room for a write (or the reader has gone)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, _settle, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def _settle(ready: asyncio.Future[None]) -> None:
    # The loop may call back again before the waiter has run and removed the callback.
    if not ready.done():
        ready.set_result(None)
