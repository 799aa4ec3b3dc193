"""envd's filesystem service (`filesystem.Filesystem`): stat, list, mkdir, move, remove and
directory watches, acting as the request's user (relative paths start at their home; what
this service creates belongs to them). All disk work runs in worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from coppice_agent.entries import entry_info
from coppice_agent.environment import SandboxEnvironment
from coppice_agent.inotify import Change, DirectoryWatch, FsChange
from coppice_agent.mounts import MOUNTINFO, network_filesystem_of
from coppice_agent.paths import acting_user, ensure_dirs, resolve_path
from coppice_agent.rpc.filesystem.filesystem_connect import Filesystem
from coppice_agent.rpc.filesystem.filesystem_pb import (
    CreateWatcherRequest,
    CreateWatcherResponse,
    EntryInfo,
    EventType,
    FilesystemEvent,
    GetWatcherEventsRequest,
    GetWatcherEventsResponse,
    ListDirRequest,
    ListDirResponse,
    MakeDirRequest,
    MakeDirResponse,
    MoveRequest,
    MoveResponse,
    RemoveRequest,
    RemoveResponse,
    RemoveWatcherRequest,
    RemoveWatcherResponse,
    StatRequest,
    StatResponse,
    WatchDirRequest,
    WatchDirResponse,
)
from coppice_agent.users import SandboxUser, UnknownUser, user_from_basic_auth

DEFAULT_KEEPALIVE_INTERVAL = 30.0
# A polled watcher nobody polls must not grow without bound; the oldest events go first.
MAX_BUFFERED_EVENTS = 10_000

Ctx: TypeAlias = RequestContext[Any, Any]
WatchRequest: TypeAlias = WatchDirRequest | CreateWatcherRequest
T = TypeVar("T")

_EVENT_TYPES = {
    Change.CREATE: EventType.CREATE,
    Change.WRITE: EventType.WRITE,
    Change.REMOVE: EventType.REMOVE,
    Change.RENAME: EventType.RENAME,
    Change.CHMOD: EventType.CHMOD,
}


class FilesystemService(Filesystem):
    """Implements the generated `Filesystem` protocol (async)."""

    def __init__(
        self,
        env: SandboxEnvironment,
        *,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        mountinfo: str = MOUNTINFO,
    ) -> None:
        self._env = env
        self._keepalive_interval = keepalive_interval
        self._mountinfo = mountinfo
        self._watchers: dict[str, _BufferedWatcher] = {}

    def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.watch.close()
        self._watchers.clear()

    async def stat(self, request: StatRequest, ctx: Ctx, /) -> StatResponse:
        path = await self._path(request.path, ctx)
        return StatResponse(entry=await _on_disk(entry_info, path))

    async def make_dir(self, request: MakeDirRequest, ctx: Ctx, /) -> MakeDirResponse:
        user = await self._user(ctx)
        path = resolve_path(request.path, user)

        def make() -> EntryInfo:
            if Path(path).is_dir():
                raise ConnectError(Code.ALREADY_EXISTS, f"directory already exists: {path}")
            if os.path.lexists(path):
                raise ConnectError(
                    Code.INVALID_ARGUMENT, f"path already exists but is not a directory: {path}"
                )
            ensure_dirs(path, user)
            return entry_info(path)

        return MakeDirResponse(entry=await _on_disk(make))

    async def move(self, request: MoveRequest, ctx: Ctx, /) -> MoveResponse:
        user = await self._user(ctx)
        source = resolve_path(request.source, user)
        destination = resolve_path(request.destination, user)

        def move() -> EntryInfo:
            if not os.path.lexists(source):
                raise ConnectError(Code.NOT_FOUND, f"path not found: {source}")
            ensure_dirs(str(Path(destination).parent), user)
            # shutil.move renames when it can and copies across filesystems otherwise.
            shutil.move(source, destination)
            return entry_info(destination)

        return MoveResponse(entry=await _on_disk(move))

    async def list_dir(self, request: ListDirRequest, ctx: Ctx, /) -> ListDirResponse:
        path = await self._path(request.path, ctx)
        depth = max(request.depth, 1)

        def listing() -> list[EntryInfo]:
            resolved = Path(path)
            if not resolved.exists():
                raise ConnectError(Code.NOT_FOUND, f"path not found: {path}")
            if not resolved.is_dir():
                raise ConnectError(Code.INVALID_ARGUMENT, f"path is not a directory: {path}")
            entries: list[EntryInfo] = []
            _walk(path, depth, entries)
            return entries

        return ListDirResponse(entries=await _on_disk(listing))

    async def remove(self, request: RemoveRequest, ctx: Ctx, /) -> RemoveResponse:
        path = await self._path(request.path, ctx)

        def remove() -> None:
            # Like envd's os.RemoveAll: a path that is not there is already removed.
            target = Path(path)
            if not target.is_dir() or target.is_symlink():
                target.unlink(missing_ok=True)
                return
            # Entries vanishing while the tree is walked are fine too; only what is still
            # there after the walk is an error, and a second walk reports why.
            shutil.rmtree(target, ignore_errors=True)
            if os.path.lexists(target):
                shutil.rmtree(target)

        await _on_disk(remove)
        return RemoveResponse()

    async def watch_dir(
        self, request: WatchDirRequest, ctx: Ctx, /
    ) -> AsyncIterator[WatchDirResponse]:
        path = await self._path(request.path, ctx)
        queue: asyncio.Queue[FilesystemEvent] = asyncio.Queue()
        watch = await self._open_watch(path, request, queue.put_nowait)
        interval = self._keepalive(ctx)
        getter: asyncio.Future[FilesystemEvent] | None = None
        try:
            start: Oneof[Literal["start"], WatchDirResponse.StartEvent] = Oneof(
                "start", WatchDirResponse.StartEvent()
            )
            yield WatchDirResponse(event=start)
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=interval)
                if not done:
                    keepalive: Oneof[Literal["keepalive"], WatchDirResponse.KeepAlive] = Oneof(
                        "keepalive", WatchDirResponse.KeepAlive()
                    )
                    yield WatchDirResponse(event=keepalive)
                    continue
                event = getter.result()
                getter = None
                change: Oneof[Literal["filesystem"], FilesystemEvent] = Oneof("filesystem", event)
                yield WatchDirResponse(event=change)
        finally:
            if getter is not None:
                getter.cancel()
            watch.close()

    async def create_watcher(
        self, request: CreateWatcherRequest, ctx: Ctx, /
    ) -> CreateWatcherResponse:
        path = await self._path(request.path, ctx)
        events: deque[FilesystemEvent] = deque(maxlen=MAX_BUFFERED_EVENTS)
        watch = await self._open_watch(path, request, events.append)
        watcher_id = str(uuid.uuid4())
        self._watchers[watcher_id] = _BufferedWatcher(watch, events)
        return CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, request: GetWatcherEventsRequest, ctx: Ctx, /
    ) -> GetWatcherEventsResponse:
        watcher = self._watcher(request.watcher_id)
        events = list(watcher.events)
        watcher.events.clear()
        return GetWatcherEventsResponse(events=events)

    async def remove_watcher(
        self, request: RemoveWatcherRequest, ctx: Ctx, /
    ) -> RemoveWatcherResponse:
        watcher = self._watcher(request.watcher_id)
        del self._watchers[request.watcher_id]
        watcher.watch.close()
        return RemoveWatcherResponse()

    # -- helpers --------------------------------------------------------------------------

    def _watcher(self, watcher_id: str) -> _BufferedWatcher:
        watcher = self._watchers.get(watcher_id)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id!r} not found")
        return watcher

    async def _user(self, ctx: Ctx) -> SandboxUser:
        name = user_from_basic_auth(ctx.request_headers.get("authorization"))
        try:
            return await asyncio.to_thread(acting_user, self._env, name)
        except UnknownUser as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from None

    async def _path(self, path: str, ctx: Ctx) -> str:
        return resolve_path(path, await self._user(ctx))

    def _keepalive(self, ctx: Ctx) -> float:
        interval = self._keepalive_interval
        requested = ctx.request_headers.get("keepalive-ping-interval")
        with contextlib.suppress(ValueError, TypeError):
            if requested is not None and float(requested) > 0:
                interval = min(interval, float(requested))
        return interval

    async def _open_watch(
        self, path: str, request: WatchRequest, sink: Callable[[FilesystemEvent], None]
    ) -> DirectoryWatch:
        include_entry = request.include_entry

        def deliver(change: FsChange) -> None:
            event = FilesystemEvent(name=change.name, type=_EVENT_TYPES[change.change])
            if include_entry and change.change is not Change.REMOVE:
                # On the loop: the entry must describe the path as it was at the event.
                with contextlib.suppress(OSError):
                    entry = entry_info(change.path)
                    event = FilesystemEvent(
                        name=change.name, type=_EVENT_TYPES[change.change], entry=entry
                    )
            sink(event)

        await _on_disk(self._check_watchable, path, request.allow_network_mounts)
        try:
            return await DirectoryWatch.open(path, recursive=request.recursive, listener=deliver)
        except OSError as exc:
            raise _os_error(exc, path) from None

    def _check_watchable(self, path: str, allow_network_mounts: bool) -> None:
        target = Path(path)
        if not target.exists():
            raise ConnectError(Code.NOT_FOUND, f"path not found: {path}")
        if not target.is_dir():
            raise ConnectError(Code.INVALID_ARGUMENT, f"path is not a directory: {path}")
        if allow_network_mounts:
            return
        fstype = network_filesystem_of(path, self._mountinfo)
        if fstype is not None:
            raise ConnectError(
                Code.INVALID_ARGUMENT,
                f"path {path} is on a network filesystem ({fstype}), where changes made "
                "elsewhere raise no events; set allow_network_mounts to watch it anyway",
            )


class _BufferedWatcher:
    def __init__(self, watch: DirectoryWatch, events: deque[FilesystemEvent]) -> None:
        self.watch = watch
        self.events = events


def _walk(directory: str, depth: int, entries: list[EntryInfo]) -> None:
    try:
        children = sorted(Path(directory).iterdir())
    except OSError:
        return
    for child in children:
        try:
            entry = entry_info(str(child))
        except OSError:
            continue  # removed while listing
        entries.append(entry)
        if depth > 1 and child.is_dir() and not child.is_symlink():
            _walk(str(child), depth - 1, entries)


async def _on_disk(func: Callable[..., T], *args: Any) -> T:
    """Run blocking filesystem work in a thread, mapping OS errors to Connect codes."""
    try:
        return await asyncio.to_thread(func, *args)
    except OSError as exc:
        raise _os_error(exc, exc.filename if isinstance(exc.filename, str) else "") from None


def _os_error(exc: OSError, path: str) -> ConnectError:
    where = f": {path}" if path else ""
    if isinstance(exc, FileNotFoundError):
        return ConnectError(Code.NOT_FOUND, f"path not found{where}")
    if isinstance(exc, PermissionError):
        return ConnectError(Code.PERMISSION_DENIED, f"permission denied{where}")
    if isinstance(exc, FileExistsError):
        return ConnectError(Code.ALREADY_EXISTS, f"path already exists{where}")
    if isinstance(exc, (NotADirectoryError, IsADirectoryError)):
        return ConnectError(Code.INVALID_ARGUMENT, f"{exc.strerror}{where}")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # Not resource_exhausted: the SDK would present that as a rate limit.
        return ConnectError(Code.INTERNAL, f"not enough disk space{where}")
    return ConnectError(Code.INTERNAL, f"{exc.strerror or exc}{where}")
