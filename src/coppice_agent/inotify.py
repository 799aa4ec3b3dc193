"""Directory watching on Linux inotify, read from the event loop (no threads).

Through ctypes rather than a library: envd reports create/write/remove/rename/chmod as they
happen (Go's fsnotify), and inotify gives exactly those, undebounced; the agent's template
gets no native extension to install for it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_IN_ISDIR = 0x40000000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_WATCH_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
_HEADER = struct.Struct("iIII")
_READ_SIZE = 64 * 1024


class Change(enum.Enum):
    CREATE = "create"
    WRITE = "write"
    REMOVE = "remove"
    RENAME = "rename"
    CHMOD = "chmod"


@dataclass(frozen=True)
class FsChange:
    change: Change
    path: str  # absolute
    name: str  # relative to the watched root


Listener = Callable[[FsChange], None]
Overflow = Callable[[], None]

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class DirectoryWatch:
    """Watches `root` (and, if `recursive`, every directory below it, including new ones) and
    calls `listener` on the event loop for every change. Close it with `close()`.

    The kernel queues at most fs.inotify.max_queued_events changes for a watch nobody reads;
    past that it drops changes and says so once, and this calls `on_overflow`."""

    def __init__(
        self, root: str, *, recursive: bool, listener: Listener, on_overflow: Overflow
    ) -> None:
        self.root = root
        self.recursive = recursive
        self._listener = listener
        self._on_overflow = on_overflow
        self._fd = _check(_lib().inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")
        self._dirs: dict[int, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    @classmethod
    async def open(
        cls, root: str, *, recursive: bool, listener: Listener, on_overflow: Overflow
    ) -> DirectoryWatch:
        watch = cls(root, recursive=recursive, listener=listener, on_overflow=on_overflow)
        try:
            # Walking a large tree is disk I/O: keep it off the event loop.
            await asyncio.to_thread(watch._add_tree, root)
        except BaseException:
            os.close(watch._fd)
            raise
        watch._loop = asyncio.get_running_loop()
        watch._loop.add_reader(watch._fd, watch._on_readable)
        return watch

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)

    def _add(self, directory: str) -> None:
        wd = _check(
            _lib().inotify_add_watch(self._fd, os.fsencode(directory), _WATCH_MASK),
            f"watch {directory}",
        )
        self._dirs[wd] = directory

    def _add_tree(self, root: str) -> None:
        self._add(root)
        if not self.recursive:
            return
        for parent, dirnames, _ in os.walk(root):
            for name in dirnames:
                path = os.path.join(parent, name)
                if not Path(path).is_symlink():
                    try:
                        self._add(path)
                    except OSError:
                        continue  # vanished or unreadable: nothing to report from there

    def _on_readable(self) -> None:
        try:
            buffer = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        offset = 0
        # A callback may close the watch; its descriptor's number may already belong to
        # another file, so nothing more of this buffer goes near it.
        while offset + _HEADER.size <= len(buffer) and not self.closed:
            wd, mask, _cookie, length = _HEADER.unpack_from(buffer, offset)
            offset += _HEADER.size
            raw_name = buffer[offset : offset + length].rstrip(b"\0")
            offset += length
            if mask & _IN_Q_OVERFLOW:
                self._on_overflow()
                continue
            self._dispatch(wd, mask, os.fsdecode(raw_name))

    def _dispatch(self, wd: int, mask: int, name: str) -> None:
        directory = self._dirs.get(wd)
        if directory is None:
            return
        if mask & _IN_IGNORED:
            self._dirs.pop(wd, None)
            return
        if not name:
            # Events about a watched directory itself: its entry in the parent (or, for the
            # root, nothing) reports the change already.
            return
        path = os.path.join(directory, name)
        if self.recursive and mask & _IN_ISDIR and mask & (_IN_CREATE | _IN_MOVED_TO):
            with contextlib.suppress(OSError):
                self._add(path)
        change = _change(mask)
        if change is not None:
            self._listener(FsChange(change, path, os.path.relpath(path, self.root)))


def _change(mask: int) -> Change | None:
    if mask & (_IN_CREATE | _IN_MOVED_TO):
        return Change.CREATE
    if mask & _IN_MODIFY:
        return Change.WRITE
    if mask & _IN_DELETE:
        return Change.REMOVE
    if mask & _IN_MOVED_FROM:
        return Change.RENAME
    if mask & _IN_ATTRIB:
        return Change.CHMOD
    return None
