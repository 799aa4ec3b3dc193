"""The body of a `/files` download: the file read from one descriptor until EOF, in worker
threads, optionally gzipped.

A stat size is only a promise for regular files, and not even then: /proc and /sys files
say 0 and have content, the lxcfs files a jail shows over /proc/meminfo and the like give a
size computed for whoever asked last, and a file can shrink while it is read. So
Content-Length is sent only for a regular file with a non-zero size outside /proc and
/sys, exactly that many bytes follow, and if the file runs out first the response is
aborted (the connection drops) instead of ending as if complete. Everything else goes
chunked, up to EOF."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import threading
import zlib
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

Encoding = Literal["identity", "gzip"]
CHUNK_SIZE = 256 * 1024
# 16 + MAX_WBITS: zlib writes the gzip container (header, CRC trailer), not its own.
_GZIP_WBITS = 16 + zlib.MAX_WBITS

log = logging.getLogger("coppice_agent.files")


class Truncated(Exception):
    """The file had fewer bytes than its size promised the client."""


class Download:
    """An open file being sent. `size` is what the response promises, None when the file is
    read to EOF whatever its stat says.

    Reads happen in worker threads and `close` on the event loop, possibly while a read is
    under way (a cancelled response): the descriptor is then closed by that read once it
    returns, never under it, where its number could be reused by another open file."""

    def __init__(self, path: str, fd: int, size: int | None) -> None:
        self.path = path
        self.size = size
        self._fd = fd
        self._lock = threading.Lock()
        self._reading = False
        self._close_requested = False

    def read(self, limit: int) -> bytes:
        with self._lock:
            if self._fd < 0:
                raise OSError(errno.EBADF, "download already closed")
            self._reading = True
        try:
            return os.read(self._fd, limit)
        finally:
            with self._lock:
                self._reading = False
                if self._close_requested:
                    self._close_now()

    def close(self) -> None:
        with self._lock:
            if self._reading:
                self._close_requested = True
            else:
                self._close_now()

    def _close_now(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_download(path: str) -> Download:
    """Raises FileNotFoundError, PermissionError, IsADirectoryError (and other OSErrors)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(path)
    except BaseException:
        os.close(fd)
        raise
    return Download(path, fd, size_promise(_opened_path(fd, path), info))


#: where sizes are no promise, whatever the file system under them says
_UNSIZED_TREES = ("/proc/", "/sys/")


def size_promise(real_path: str, info: os.stat_result) -> int | None:
    """The Content-Length a download of the file at `real_path` (symlinks resolved) may
    promise, or None to send it chunked, up to EOF."""
    if real_path.startswith(_UNSIZED_TREES):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) and info.st_size > 0 else None


def _opened_path(fd: int, path: str) -> str:
    """What `fd` really is: a symlink elsewhere may point into /proc."""
    try:
        return str(Path(f"/proc/self/fd/{fd}").readlink())
    except OSError:
        return str(Path(path).resolve())


def choose_encoding(accept_encoding: str | None) -> Encoding | None:
    """The coding to send, or None if the client accepts neither we have (406).

    gzip only when asked for it specifically: named as the client's one coding (what the
    SDK's `gzip=True` sends) or with identity refused. httpx and browsers offer
    `gzip, deflate[, br]` on every request, and answering those with gzip would cost the
    sandbox CPU and every download its Content-Length."""
    if accept_encoding is None or not accept_encoding.strip():
        return "identity"
    weights = _weights(accept_encoding)
    anything = weights.get("*")
    # Unless refused, identity is always acceptable (RFC 9110 §12.5.3).
    identity = weights.get("identity", 1.0 if anything is None else anything)
    gzip = weights.get("gzip", 0.0 if anything is None else anything)
    named = weights.keys() - {"identity", "*"}
    asked_for_gzip = named == {"gzip"} and gzip >= weights.get("identity", 0.0)
    if gzip > 0 and (identity == 0 or asked_for_gzip):
        return "gzip"
    return "identity" if identity > 0 else None


def _weights(accept_encoding: str) -> dict[str, float]:
    """Coding → q-value; the first mention of a coding counts, malformed ones are ignored."""
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        coding = coding.lower()
        if coding == "x-gzip":
            coding = "gzip"
        if not coding or coding in weights:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = -1.0
        if q >= 0:
            weights[coding] = q
    return weights


class _Reader:
    """Produces the body one chunk at a time; `next` does blocking reads (worker threads)."""

    def __init__(self, download: Download, *, gzip: bool) -> None:
        self._download = download
        self._remaining = download.size
        self._sent = 0
        self._deflate = zlib.compressobj(wbits=_GZIP_WBITS) if gzip else None

    def next(self) -> tuple[bytes, bool]:
        """(data, whether it is the last chunk). Raises Truncated or OSError."""
        limit = CHUNK_SIZE if self._remaining is None else min(CHUNK_SIZE, self._remaining)
        data = self._download.read(limit)
        self._sent += len(data)
        if self._remaining is None:
            last = not data
        else:
            if not data:
                raise Truncated(
                    f"{self._download.path} shrank while it was read: {self._sent} of the "
                    f"{self._download.size} bytes promised were there"
                )
            self._remaining -= len(data)
            last = self._remaining == 0
        if self._deflate is not None:
            data = self._deflate.compress(data) + (self._deflate.flush() if last else b"")
        return data, last


class FileStream(Response):
    """The 200 response for a download; it owns (and closes) the descriptor."""

    media_type = "application/octet-stream"

    def __init__(self, download: Download, *, gzip: bool) -> None:
        # Not Response.__init__: it would promise Content-Length: 0 for the empty body.
        self.status_code = 200
        self.background = None
        self._download = download
        self._gzip = gzip
        headers = {"content-disposition": _attachment(Path(download.path).name)}
        if gzip:
            headers["content-encoding"] = "gzip"
        elif download.size is not None:
            headers["content-length"] = str(download.size)
            headers["accept-ranges"] = "bytes"  # files.py serves Range for exactly these
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn's send() ignores a client that has gone; only receive() tells, and without
        # asking, /dev/zero or a huge file would be read to the end for nobody.
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            reader = _Reader(self._download, gzip=self._gzip)
            last = False
            while not last and not gone.done():
                data, last = await asyncio.to_thread(reader.next)
                await send({"type": "http.response.body", "body": data, "more_body": not last})
        except Truncated as exc:
            # Returning with the body unfinished makes the server drop the connection, which
            # is the point; raising would do the same with a traceback in the sandbox's log.
            log.warning("download aborted: %s", exc)
        finally:
            gone.cancel()
            self._download.close()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _attachment(name: str) -> str:
    quoted = quote(name)
    if quoted == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename*=utf-8''{quoted}"
