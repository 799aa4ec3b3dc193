"""filesystem.Filesystem over real HTTP: the generated sync client against the envd app."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.codec import proto_binary_codec
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo
from connectrpc.request import Headers, RequestContext

from coppice_agent.filesystem import FilesystemService
from coppice_agent.rpc.filesystem.filesystem_connect import FilesystemClientSync
from coppice_agent.rpc.filesystem.filesystem_pb import (
    CreateWatcherRequest,
    EventType,
    FilesystemEvent,
    FileType,
    GetWatcherEventsRequest,
    ListDirRequest,
    MakeDirRequest,
    MoveRequest,
    RemoveRequest,
    RemoveWatcherRequest,
    StatRequest,
    WatchDirRequest,
    WatchDirResponse,
)
from tests.agent.envd_harness import EnvdServer, basic_auth, eventually, running_envd, sandbox_env
from tests.waiting import wait_until

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture(scope="module")
def envd(home: Path) -> Iterator[EnvdServer]:
    with running_envd(sandbox_env(home), keepalive_interval=0.2) as server:
        yield server


@pytest.fixture
def fs(envd: EnvdServer) -> Iterator[FilesystemClientSync]:
    with envd.filesystem() as client:
        yield client


def test_stat_file_and_directory(fs: FilesystemClientSync, tmp_path: Path) -> None:
    target = tmp_path / "hello.txt"
    target.write_text("hello")
    target.chmod(0o640)
    entry = fs.stat(StatRequest(path=str(target))).entry
    assert entry is not None
    assert entry.name == "hello.txt"
    assert entry.type == FileType.FILE
    assert entry.path == str(target)
    assert entry.size == 5
    assert entry.mode == 0o640
    assert entry.permissions == "-rw-r-----"
    assert entry.owner == "root"
    assert entry.group == "root"
    assert entry.modified_time is not None
    assert abs(entry.modified_time.to_seconds() - target.stat().st_mtime) < 1
    assert not entry.is_symlink
    directory = fs.stat(StatRequest(path=str(tmp_path))).entry
    assert directory is not None
    assert directory.type == FileType.DIRECTORY
    assert directory.permissions.startswith("d")


def test_stat_symlink_and_missing(fs: FilesystemClientSync, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    entry = fs.stat(StatRequest(path=str(tmp_path / "link"))).entry
    assert entry is not None
    assert entry.is_symlink
    assert entry.type == FileType.DIRECTORY
    assert entry.symlink_target == str(tmp_path / "real")
    with pytest.raises(ConnectError) as info:
        fs.stat(StatRequest(path=str(tmp_path / "missing")))
    assert info.value.code == Code.NOT_FOUND


def test_relative_paths_start_at_home(fs: FilesystemClientSync, home: Path) -> None:
    entry = fs.stat(StatRequest(path=".")).entry
    assert entry is not None
    assert entry.path == str(home)


def test_list_dir_depths(fs: FilesystemClientSync, tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "deep.txt").write_text("x")
    (tmp_path / "top.txt").write_text("x")
    one = {e.path for e in fs.list_dir(ListDirRequest(path=str(tmp_path), depth=1)).entries}
    assert one == {str(tmp_path / "a"), str(tmp_path / "top.txt")}
    three = {e.path for e in fs.list_dir(ListDirRequest(path=str(tmp_path), depth=3)).entries}
    assert str(tmp_path / "a" / "b" / "deep.txt") in three
    with pytest.raises(ConnectError) as info:
        fs.list_dir(ListDirRequest(path=str(tmp_path / "nope"), depth=1))
    assert info.value.code == Code.NOT_FOUND
    with pytest.raises(ConnectError) as info:
        fs.list_dir(ListDirRequest(path=str(tmp_path / "top.txt"), depth=1))
    assert info.value.code == Code.INVALID_ARGUMENT


def test_make_dir_with_parents_owned_by_user(fs: FilesystemClientSync, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    target = tmp_path / "x" / "y"
    entry = fs.make_dir(MakeDirRequest(path=str(target)), headers=basic_auth("nobody")).entry
    assert entry is not None
    assert entry.type == FileType.DIRECTORY
    assert entry.owner == "nobody"
    assert target.stat().st_uid == NOBODY.pw_uid
    assert (tmp_path / "x").stat().st_uid == NOBODY.pw_uid
    with pytest.raises(ConnectError) as info:
        fs.make_dir(MakeDirRequest(path=str(target)))
    assert info.value.code == Code.ALREADY_EXISTS


def test_move_and_remove(fs: FilesystemClientSync, tmp_path: Path) -> None:
    (tmp_path / "src.txt").write_text("data")
    entry = fs.move(
        MoveRequest(source=str(tmp_path / "src.txt"), destination=str(tmp_path / "d" / "dst.txt"))
    ).entry
    assert entry is not None
    assert entry.path == str(tmp_path / "d" / "dst.txt")
    assert (tmp_path / "d" / "dst.txt").read_text() == "data"
    with pytest.raises(ConnectError) as info:
        fs.move(MoveRequest(source=str(tmp_path / "gone"), destination=str(tmp_path / "z")))
    assert info.value.code == Code.NOT_FOUND

    fs.remove(RemoveRequest(path=str(tmp_path / "d")))
    assert not (tmp_path / "d").exists()
    (tmp_path / "f").write_text("x")
    fs.remove(RemoveRequest(path=str(tmp_path / "f")))
    assert not (tmp_path / "f").exists()
    # As envd (os.RemoveAll): what is not there is removed already.
    fs.remove(RemoveRequest(path=str(tmp_path / "f")))


def test_binary_codec(envd: EnvdServer, tmp_path: Path) -> None:
    with envd.filesystem(codec=proto_binary_codec()) as client:
        entry = client.stat(StatRequest(path=str(tmp_path))).entry
    assert entry is not None
    assert entry.type == FileType.DIRECTORY


def poll_events(fs: FilesystemClientSync, watcher_id: str, want: int) -> list[FilesystemEvent]:
    """What the watcher reports until it has reported `want` events (or the wait gives up)."""
    events: list[FilesystemEvent] = []

    def enough() -> bool:
        events.extend(fs.get_watcher_events(GetWatcherEventsRequest(watcher_id=watcher_id)).events)
        return len(events) >= want

    wait_until(enough)
    return events


def test_buffered_watcher_events(fs: FilesystemClientSync, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    watcher_id = fs.create_watcher(
        CreateWatcherRequest(path=str(tmp_path), recursive=True, include_entry=True)
    ).watcher_id
    (tmp_path / "new.txt").write_text("x")
    (tmp_path / "new.txt").chmod(0o600)
    (tmp_path / "new.txt").rename(tmp_path / "moved.txt")
    (tmp_path / "sub" / "inner.txt").write_text("y")
    (tmp_path / "moved.txt").unlink()
    (tmp_path / "kept.txt").write_text("z")
    events = poll_events(fs, watcher_id, want=9)
    seen = {(e.name, e.type) for e in events}
    assert ("new.txt", EventType.CREATE) in seen
    assert ("new.txt", EventType.WRITE) in seen
    assert ("new.txt", EventType.CHMOD) in seen
    assert ("new.txt", EventType.RENAME) in seen
    assert ("moved.txt", EventType.CREATE) in seen
    assert (os.path.join("sub", "inner.txt"), EventType.CREATE) in seen
    assert ("moved.txt", EventType.REMOVE) in seen
    # The entry describes the path when the event is read off inotify, so use one that stays.
    created = next(e for e in events if e.name == "kept.txt" and e.type == EventType.CREATE)
    assert created.entry is not None
    assert created.entry.type == FileType.FILE
    assert created.entry.path == str(tmp_path / "kept.txt")
    fs.remove_watcher(RemoveWatcherRequest(watcher_id=watcher_id))
    with pytest.raises(ConnectError) as info:
        fs.get_watcher_events(GetWatcherEventsRequest(watcher_id=watcher_id))
    assert info.value.code == Code.NOT_FOUND


def test_watcher_errors(fs: FilesystemClientSync, tmp_path: Path) -> None:
    with pytest.raises(ConnectError) as info:
        fs.create_watcher(CreateWatcherRequest(path=str(tmp_path / "missing")))
    assert info.value.code == Code.NOT_FOUND
    (tmp_path / "file").write_text("")
    with pytest.raises(ConnectError) as info:
        fs.create_watcher(CreateWatcherRequest(path=str(tmp_path / "file")))
    assert info.value.code == Code.INVALID_ARGUMENT


def test_non_recursive_watch_ignores_subdirectories(
    fs: FilesystemClientSync, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    watcher_id = fs.create_watcher(CreateWatcherRequest(path=str(tmp_path))).watcher_id
    (tmp_path / "sub" / "hidden.txt").write_text("x")
    (tmp_path / "visible.txt").write_text("x")
    events = poll_events(fs, watcher_id, want=2)
    names = {e.name for e in events}
    assert "visible.txt" in names
    assert not any(name.startswith("sub/") for name in names)
    fs.remove_watcher(RemoveWatcherRequest(watcher_id=watcher_id))


def test_watch_dir_stream(envd: EnvdServer, tmp_path: Path) -> None:
    received: list[WatchDirResponse] = []
    kept_alive = threading.Event()

    def watch() -> None:
        with envd.filesystem() as client:
            stream = client.watch_dir(WatchDirRequest(path=str(tmp_path)))
            for response in stream:
                received.append(response)
                if response.event is not None and response.event.field == "keepalive":
                    kept_alive.set()
                if response.event is not None and response.event.field == "filesystem":
                    break
            stream.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=watch)
    thread.start()
    # A quiet watch sends keepalives; the change comes after the first.
    assert kept_alive.wait(5)
    (tmp_path / "streamed.txt").write_text("x")
    thread.join(timeout=5)
    kinds = [r.event.field for r in received if r.event is not None]
    assert kinds[0] == "start"
    assert "keepalive" in kinds
    last = received[-1].event
    assert last is not None and last.field == "filesystem"
    assert last.value.name == "streamed.txt"
    assert last.value.type == EventType.CREATE


def touch_all(directory: Path, count: int) -> list[str]:
    """Create `count` empty files, one CREATE event each; their names, in order."""
    names = [f"f{i:02d}" for i in range(count)]
    for name in names:
        (directory / name).touch()
    return names


def test_polled_watch_that_falls_behind_reports_the_gap(home: Path, tmp_path: Path) -> None:
    env = sandbox_env(home)
    filesystem = FilesystemService(env, max_buffered_events=3)
    with running_envd(env, filesystem=filesystem) as server, server.filesystem() as fs:
        watcher_id = fs.create_watcher(CreateWatcherRequest(path=str(tmp_path))).watcher_id
        request = GetWatcherEventsRequest(watcher_id=watcher_id)
        created = touch_all(tmp_path, 10)
        events: list[FilesystemEvent] = []
        failures: list[ConnectError] = []

        def failed() -> bool:
            try:
                events.extend(fs.get_watcher_events(request).events)
            except ConnectError as exc:
                failures.append(exc)
                return True
            return False

        assert wait_until(failed)
        # Whatever was kept arrives, in order, and then the gap is reported where it is.
        names = [e.name for e in events]
        assert 3 <= len(names) < len(created)
        assert names == created[: len(names)]
        assert failures[0].code == Code.INTERNAL
        assert failures[0].message.startswith("watcher error: more than 3 events")
        # It stays reported, and the watch can still be removed.
        with pytest.raises(ConnectError) as info:
            fs.get_watcher_events(request)
        assert info.value.code == Code.INTERNAL
        fs.remove_watcher(RemoveWatcherRequest(watcher_id=watcher_id))


def watch_dir_context() -> RequestContext[Any, Any]:
    method: MethodInfo[WatchDirRequest, WatchDirResponse] = MethodInfo(
        name="WatchDir",
        service_name="filesystem.Filesystem",
        input=WatchDirRequest,
        output=WatchDirResponse,
        idempotency_level=IdempotencyLevel.UNKNOWN,
    )
    return RequestContext(method=method, http_method="POST", request_headers=Headers())


def test_streamed_watch_that_falls_behind_ends_with_an_error(
    home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Called directly, the stream is read exactly as slowly as this test reads it; over HTTP
    # the sockets' buffers would take in thousands of events first.
    service = FilesystemService(sandbox_env(home), max_buffered_events=3)
    caplog.set_level(logging.WARNING, logger="coppice_agent.filesystem")

    async def watch() -> tuple[list[str], ConnectError]:
        stream = service.watch_dir(WatchDirRequest(path=str(tmp_path)), watch_dir_context())
        first = await anext(stream)
        assert first.event is not None and first.event.field == "start"
        touch_all(tmp_path, 10)
        assert await eventually(lambda: "stopped: more than 3 events" in caplog.text)
        names: list[str] = []
        with pytest.raises(ConnectError) as info:
            async for response in stream:
                assert response.event is not None and response.event.field == "filesystem"
                names.append(response.event.value.name)
        return names, info.value

    names, error = asyncio.run(watch())
    assert names == ["f00", "f01", "f02"]
    assert error.code == Code.INTERNAL
    assert error.message.startswith("watcher error: more than 3 events")
    assert str(tmp_path) in error.message
    assert len([r for r in caplog.records if "stopped" in r.getMessage()]) == 1
