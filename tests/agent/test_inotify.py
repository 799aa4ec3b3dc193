"""The inotify reader on its own: what it says when the kernel's queue overflows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coppice_agent.inotify import DirectoryWatch, FsChange
from tests.agent.envd_harness import eventually

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


def test_kernel_queue_overflow_is_reported(tmp_path: Path) -> None:
    limit = int(MAX_QUEUED_EVENTS.read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many changes to make")

    async def watch() -> tuple[int, int]:
        changes: list[FsChange] = []
        overflows: list[None] = []
        watch = await DirectoryWatch.open(
            str(tmp_path),
            recursive=False,
            listener=changes.append,
            on_overflow=lambda: overflows.append(None),
        )
        try:
            # Two events per rename, and the loop does not run (so nothing reads the queue)
            # until they are all made.
            here, there = tmp_path / "here", tmp_path / "there"
            here.touch()
            for _ in range(limit // 4 + 1):
                here.rename(there)
                there.rename(here)
            assert await eventually(lambda: bool(overflows))
        finally:
            watch.close()
        return len(changes), len(overflows)

    changes, overflows = asyncio.run(watch())
    assert overflows == 1
    assert changes <= limit
