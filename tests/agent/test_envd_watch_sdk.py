"""Directory watches through the unmodified SDK: `include_entry` (envd 0.6.3) on both the
polled watcher (sync SDK) and the WatchDir stream (async SDK), and `allow_network_mounts`
(envd 0.6.4)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2b import AsyncSandbox, FilesystemEvent, FilesystemEventType, FileType, Sandbox
from e2b.exceptions import InvalidArgumentException
from e2b.sandbox_sync.filesystem.watch_handle import WatchHandle

from coppice_agent.filesystem import FilesystemService
from tests.agent.envd_harness import EnvdServer, running_envd, sandbox_env, sdk_options
from tests.waiting import wait_until

ROOT_MOUNT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
# A streamed watch the client stopped ends at the server's next write: keep that soon, or
# shutting the server down waits for it.
KEEPALIVE = 0.2


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[EnvdServer]:
    env = sandbox_env(home)
    with running_envd(env, keepalive_interval=KEEPALIVE) as server:
        yield server


@pytest.fixture(scope="module")
def sandbox(server: EnvdServer) -> Sandbox:
    return Sandbox(**sdk_options(server))


def events_until(
    handle: WatchHandle, done: Callable[[list[FilesystemEvent]], bool]
) -> list[FilesystemEvent]:
    """What a polled watch reports until `done` holds for it (or the wait gives up)."""
    events: list[FilesystemEvent] = []

    def finished() -> bool:
        events.extend(handle.get_new_events())
        return done(events)

    wait_until(finished)
    return events


def removed(events: list[FilesystemEvent]) -> bool:
    return any(e.type == FilesystemEventType.REMOVE for e in events)


def make_changes(directory: Path) -> None:
    (directory / "plain.txt").write_text("x")
    tagged = directory / "tagged.txt"
    tagged.write_text("y")
    os.setxattr(tagged, "user.e2b.tag", b"v1")
    # IN_ATTRIB: a CHMOD event, by which time the entry carries the metadata.
    tagged.chmod(0o600)
    (directory / "plain.txt").unlink()


def check_entries(events: list[FilesystemEvent], directory: Path) -> None:
    created = next(
        e for e in events if e.name == "tagged.txt" and e.type == FilesystemEventType.CREATE
    )
    assert created.entry is not None
    assert created.entry.path == str(directory / "tagged.txt")
    assert created.entry.type == FileType.FILE
    # setxattr and chmod each raise IN_ATTRIB; an entry is read when its event is handled,
    # so only the last one is sure to see both changes.
    chmod = [e for e in events if e.name == "tagged.txt" and e.type == FilesystemEventType.CHMOD][
        -1
    ]
    assert chmod.entry is not None
    assert chmod.entry.metadata == {"tag": "v1"}
    assert chmod.entry.mode == 0o600
    # What is gone has no entry to describe.
    removed = next(
        e for e in events if e.name == "plain.txt" and e.type == FilesystemEventType.REMOVE
    )
    assert removed.entry is None


def test_polled_watch_includes_entries(sandbox: Sandbox, tmp_path: Path) -> None:
    handle = sandbox.files.watch_dir(str(tmp_path), include_entry=True)
    try:
        make_changes(tmp_path)
        check_entries(events_until(handle, removed), tmp_path)
    finally:
        handle.stop()


def test_polled_watch_without_entries(sandbox: Sandbox, tmp_path: Path) -> None:
    handle = sandbox.files.watch_dir(str(tmp_path))
    try:
        (tmp_path / "f").write_text("x")
        events = events_until(handle, bool)
        assert events
        assert all(e.entry is None for e in events)
    finally:
        handle.stop()


def test_streamed_watch_includes_entries(server: EnvdServer, tmp_path: Path) -> None:
    async def watch() -> list[FilesystemEvent]:
        sbx = AsyncSandbox(**sdk_options(server))
        events: list[FilesystemEvent] = []
        removed = asyncio.Event()

        def on_event(event: FilesystemEvent) -> None:
            events.append(event)
            if event.type == FilesystemEventType.REMOVE:
                removed.set()

        handle = await sbx.files.watch_dir(str(tmp_path), on_event, include_entry=True)
        try:
            await asyncio.to_thread(make_changes, tmp_path)
            await asyncio.wait_for(removed.wait(), 5)
        finally:
            await handle.stop()  # type: ignore[no-untyped-call]
        return events

    check_entries(asyncio.run(watch()), tmp_path)


@pytest.fixture
def nfs_server(home: Path, tmp_path: Path) -> Iterator[EnvdServer]:
    """An envd whose mount table says `tmp_path/share` is an NFS mount."""
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    (tmp_path / "local").mkdir()
    (tmp_path / "to-share").symlink_to(share)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        ROOT_MOUNT + f"90 22 0:50 / {share.resolve()} rw,relatime - nfs4 host:/export rw,vers=4.2\n"
    )
    env = sandbox_env(home)
    filesystem = FilesystemService(env, keepalive_interval=KEEPALIVE, mountinfo=str(mountinfo))
    with running_envd(env, keepalive_interval=KEEPALIVE, filesystem=filesystem) as server:
        yield server


def test_watching_a_network_mount_needs_allow_network_mounts(
    nfs_server: EnvdServer, tmp_path: Path
) -> None:
    sbx = Sandbox(**sdk_options(nfs_server))
    share = tmp_path / "share"
    # The mount itself, a directory below it and a symlink into it.
    for path in (share, share / "sub", tmp_path / "to-share"):
        with pytest.raises(InvalidArgumentException, match=r"network filesystem \(nfs4\)"):
            sbx.files.watch_dir(str(path))
    sbx.files.watch_dir(str(tmp_path / "local")).stop()

    handle = sbx.files.watch_dir(str(share), allow_network_mounts=True)
    try:
        (share / "seen.txt").write_text("x")
        events = events_until(handle, bool)
        assert "seen.txt" in {e.name for e in events}
    finally:
        handle.stop()


def test_streamed_watch_of_a_network_mount(nfs_server: EnvdServer, tmp_path: Path) -> None:
    async def watch() -> None:
        sbx = AsyncSandbox(**sdk_options(nfs_server))
        with pytest.raises(InvalidArgumentException, match="allow_network_mounts"):
            await sbx.files.watch_dir(str(tmp_path / "share"), lambda _: None)
        handle = await sbx.files.watch_dir(
            str(tmp_path / "share"), lambda _: None, allow_network_mounts=True
        )
        await handle.stop()  # type: ignore[no-untyped-call]

    asyncio.run(watch())
