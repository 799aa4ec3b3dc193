"""envd's filesystem service (`filesystem.Filesystem`): stat, list, mkdir, move, remove and
directory watches, acting as the request's user (relative paths start at their home; what
this service creates belongs to them). All disk work runs in worker threads.

A watch keeps at most `MAX_BUFFERED_EVENTS` events its client has not read yet, whether it
is polled (CreateWatcher, GetWatcherEvents) or streamed (WatchDir): the agent lives in the
sandbox's memory cgroup, and a client that stops reading must not grow it. One event more,
or the kernel's own inotify queue overflowing, and the watch stops, logging a warning. The
client still gets every event kept before the gap, then the error envd gives for a watch
whose fsnotify queue overflowed: `internal`, "watcher error: ..." (the stream ends with it;
every later GetWatcherEvents returns it). It has to list the directory and watch it anew:
a watch that went on past a gap would report changes to a state the client never saw."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
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
MAX_BUFFERED_EVENTS = 10_000

Ctx: TypeAlias = RequestContext[Any, Any]
WatchRequest: TypeAlias = WatchDirRequest | CreateWatcherRequest
T = TypeVar("T")

log = logging.getLogger(__name__)

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
        max_buffered_events: int = MAX_BUFFERED_EVENTS,
    ) -> None:
        self._env = env
        self._keepalive_interval = keepalive_interval
        self._mountinfo = mountinfo
        self._max_buffered_events = max_buffered_events
        self._watchers: dict[str, _Watch] = {}
        self._streams: set[_Watch] = set()

    def close(self) -> None:
        """Stop every watch, polled or streamed (a stream still open then sees no more
        events)."""
        for watch in [*self._watchers.values(), *self._streams]:
            watch.close()
        self._watchers.clear()
        self._streams.clear()

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
        watch = await self._open_watch(path, request)
        self._streams.add(watch)
        interval = self._keepalive(ctx)
        try:
            start: Oneof[Literal["start"], WatchDirResponse.StartEvent] = Oneof(
                "start", WatchDirResponse.StartEvent()
            )
            yield WatchDirResponse(event=start)
            while True:
                if not await watch.wait(interval):
                    keepalive: Oneof[Literal["keepalive"], WatchDirResponse.KeepAlive] = Oneof(
                        "keepalive", WatchDirResponse.KeepAlive()
                    )
                    yield WatchDirResponse(event=keepalive)
                    continue
                for event in watch.take():
                    change: Oneof[Literal["filesystem"], FilesystemEvent] = Oneof(
                        "filesystem", event
                    )
                    yield WatchDirResponse(event=change)
        finally:
            self._streams.discard(watch)
            watch.close()

    async def create_watcher(
        self, request: CreateWatcherRequest, ctx: Ctx, /
    ) -> CreateWatcherResponse:
        path = await self._path(request.path, ctx)
        watcher_id = str(uuid.uuid4())
        self._watchers[watcher_id] = await self._open_watch(path, request)
        return CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, request: GetWatcherEventsRequest, ctx: Ctx, /
    ) -> GetWatcherEventsResponse:
        return GetWatcherEventsResponse(events=self._watcher(request.watcher_id).take())

    async def remove_watcher(
        self, request: RemoveWatcherRequest, ctx: Ctx, /
    ) -> RemoveWatcherResponse:
        watch = self._watcher(request.watcher_id)
        del self._watchers[request.watcher_id]
        watch.close()
        return RemoveWatcherResponse()

    # -- helpers --------------------------------------------------------------------------

    def _watcher(self, watcher_id: str) -> _Watch:
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

    async def _open_watch(self, path: str, request: WatchRequest) -> _Watch:
        include_entry = request.include_entry
        watch = _Watch(path, self._max_buffered_events)

        def deliver(change: FsChange) -> None:
            event = FilesystemEvent(name=change.name, type=_EVENT_TYPES[change.change])
            if include_entry and change.change is not Change.REMOVE:
                # On the loop: the entry must describe the path as it was at the event.
                with contextlib.suppress(OSError):
                    entry = entry_info(change.path)
                    event = FilesystemEvent(
                        name=change.name, type=_EVENT_TYPES[change.change], entry=entry
                    )
            watch.add(event)

        await _on_disk(self._check_watchable, path, request.allow_network_mounts)
        try:
            watch.inotify = await DirectoryWatch.open(
                path,
                recursive=request.recursive,
                listener=deliver,
                on_overflow=lambda: watch.lose("the kernel's inotify queue overflowed"),
            )
        except OSError as exc:
            raise _os_error(exc, path) from None
        return watch

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


class _Watch:
    """One directory watch and the events it has raised that its client has not read yet: at
    most `limit`, then the watch stops (see the module's docstring)."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.inotify: DirectoryWatch | None = None
        self._limit = limit
        self._events: deque[FilesystemEvent] = deque()
        self._ready = asyncio.Event()
        self._lost: str | None = None

    def add(self, event: FilesystemEvent) -> None:
        if self._lost is not None:
            return
        if len(self._events) >= self._limit:
            self.lose(f"more than {self._limit} events were waiting for the client to read")
            return
        self._events.append(event)
        self._ready.set()

    def lose(self, reason: str) -> None:
        """Events are being lost: stop watching, and tell the client once it has read the rest."""
        if self._lost is not None:
            return
        self._lost = reason
        log.warning("watch of %s stopped: %s", self.path, reason)
        self.close()
        self._ready.set()

    def take(self) -> list[FilesystemEvent]:
        """Every event not read yet; once none are left of a watch that lost some, the error
        that says so."""
        if not self._events and self._lost is not None:
            raise ConnectError(
                Code.INTERNAL,
                f"watcher error: {self._lost}, and later changes were lost; list {self.path} "
                "again and start a new watch",
            )
        events = list(self._events)
        self._events.clear()
        if self._lost is None:
            self._ready.clear()
        return events

    async def wait(self, timeout: float) -> bool:
        """Whether something is there to `take` within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()


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
