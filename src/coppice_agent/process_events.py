"""The `ProcessEvent`s a Start or Connect stream carries, and the broadcast that hands every
event of one process to each stream following it.

A stream sees what happens from the moment it follows; nothing is replayed (envd keeps no
output history either), so a stream must follow before the process can produce anything it
should see."""

from __future__ import annotations

import asyncio
import signal
from typing import Literal

from protobuf import Oneof

from coppice_agent.rpc.process.process_pb import ProcessEvent


class EventBroadcast:
    """The streams following one process, each with its own queue of events not yet sent.

    The queues are unbounded: one grows for as long as its stream is slower than the
    process's output, until the stream catches up or goes away (which frees it). envd instead
    hands each event to every stream in turn, so there the slowest stream holds the process's
    output back."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[ProcessEvent]] = set()

    def follow(self) -> asyncio.Queue[ProcessEvent]:
        queue: asyncio.Queue[ProcessEvent] = asyncio.Queue()
        self._queues.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[ProcessEvent]) -> None:
        self._queues.discard(queue)

    @property
    def followers(self) -> int:
        return len(self._queues)

    def publish(self, event: ProcessEvent) -> None:
        for queue in self._queues:
            queue.put_nowait(event)


def start_event(pid: int) -> ProcessEvent:
    start: Oneof[Literal["start"], ProcessEvent.StartEvent] = Oneof(
        "start", ProcessEvent.StartEvent(pid=pid)
    )
    return ProcessEvent(event=start)


def keepalive_event() -> ProcessEvent:
    keepalive: Oneof[Literal["keepalive"], ProcessEvent.KeepAlive] = Oneof(
        "keepalive", ProcessEvent.KeepAlive()
    )
    return ProcessEvent(event=keepalive)


def data_event(field: str, chunk: bytes) -> ProcessEvent:
    """`chunk` of output on `field`: "stdout", "stderr" or "pty"."""
    return ProcessEvent(
        event=Oneof("data", ProcessEvent.DataEvent(output=Oneof(field, chunk)))  # type: ignore[arg-type]
    )


def end_event(returncode: int) -> ProcessEvent:
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


def is_end(event: ProcessEvent) -> bool:
    return event.event is not None and event.event.field == "end"


def _signal_text(signum: int) -> str:
    text = signal.strsignal(signum)
    if not text:
        return f"signal {signum}"
    return text[0].lower() + text[1:]
