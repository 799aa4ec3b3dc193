"""envd's plain-HTTP `/files`: download (GET) and upload (POST, multipart or a raw body).

Uploads stream to their destination as they arrive: the multipart parser and the file writes
run in a worker thread one received chunk at a time, so neither the body nor a temp copy is
ever held whole. Downloads read the file until EOF the same way. Errors use envd's body
shape, `{"code": <int>, "message": "..."}`."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from coppice_agent.downloads import Download, FileStream, choose_encoding, open_download
from coppice_agent.environment import SandboxEnvironment
from coppice_agent.metadata import InvalidMetadata, metadata_from_headers, replace_metadata
from coppice_agent.metadata import unsupported as xattrs_unsupported
from coppice_agent.paths import acting_user, ensure_dirs, resolve_path
from coppice_agent.users import SandboxUser, UnknownUser, user_from_basic_auth

MAX_PARTS = 1000
T = TypeVar("T")
Metadata = dict[str, str]
_MAX_PART_HEADER_BYTES = 16 * 1024
_NOT_ACCEPTABLE = "no acceptable encoding found, supported: [identity, gzip]"


class HTTPFailure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


class FilesEndpoints:
    def __init__(self, env: SandboxEnvironment) -> None:
        self._env = env

    def routes(self) -> list[Route]:
        return [
            Route("/files", self.download, methods=["GET", "HEAD"]),
            Route("/files", self.upload, methods=["POST"]),
        ]

    async def download(self, request: Request) -> Response:
        try:
            user = await self._user(request)
            raw = request.query_params.get("path")
            if not raw:
                raise HTTPFailure(400, "the path query parameter is required")
            path = resolve_path(raw, user)
            encoding = choose_encoding(request.headers.get("accept-encoding"))
            if encoding is None:
                raise HTTPFailure(406, _NOT_ACCEPTABLE)
            source = await _disk(_open_readable, path)
        except HTTPFailure as failure:
            return failure.response()
        if "range" in request.headers and source.size is not None and encoding == "identity":
            # Resumed downloads of ordinary files: starlette's ranges, which stop short (and
            # so break the connection) rather than pad if the file shrinks meanwhile.
            source.close()
            return FileResponse(
                path,
                media_type="application/octet-stream",
                filename=Path(path).name,
                content_disposition_type="attachment",
            )
        return FileStream(source, gzip=encoding == "gzip")

    async def upload(self, request: Request) -> Response:
        try:
            user = await self._user(request)
            metadata = _request_metadata(request)
            query_path = request.query_params.get("path") or None
            content_type, options = parse_options_header(request.headers.get("content-type"))
            if content_type == b"multipart/form-data":
                boundary = options.get(b"boundary")
                if not boundary:
                    raise HTTPFailure(400, "multipart body without a boundary")
                sink: _Sink = _MultipartSink(boundary, user, query_path, metadata)
            else:
                if query_path is None:
                    raise HTTPFailure(400, "the path query parameter is required")
                sink = _RawSink(resolve_path(query_path, user), user, metadata)
            written = await _receive(request, sink)
        except HTTPFailure as failure:
            return failure.response()
        if not written:
            return error_response(400, "the request contained no file")
        return JSONResponse([_written_entry(path, metadata) for path in written])

    async def _user(self, request: Request) -> SandboxUser:
        name = request.query_params.get("username") or user_from_basic_auth(
            request.headers.get("authorization")
        )
        try:
            return await asyncio.to_thread(acting_user, self._env, name)
        except UnknownUser as exc:
            raise HTTPFailure(400, str(exc)) from None


def _open_readable(path: str) -> Download:
    try:
        return open_download(path)
    except (FileNotFoundError, NotADirectoryError):
        raise HTTPFailure(404, f"path '{path}' does not exist") from None
    except IsADirectoryError:
        raise HTTPFailure(400, f"path '{path}' is a directory") from None
    except PermissionError:
        raise HTTPFailure(403, f"path '{path}' is not readable") from None


def _request_metadata(request: Request) -> Metadata:
    try:
        return metadata_from_headers(request.headers.raw)
    except InvalidMetadata as exc:
        raise HTTPFailure(400, str(exc)) from None


def _written_entry(path: str, metadata: Metadata) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": Path(path).name, "type": "file", "path": path}
    if metadata:
        entry["metadata"] = metadata
    return entry


class _Sink:
    """Consumes the body chunk by chunk (in a worker thread); `finish` returns written paths."""

    def feed(self, chunk: bytes) -> None:
        raise NotImplementedError

    def finish(self) -> list[str]:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class _OpenFile:
    """A destination being written: created (with parents) as the acting user, truncated,
    given the upload's metadata in place of what it had, and removed again if the upload
    fails half way so a full disk is not left fuller."""

    def __init__(self, path: str, user: SandboxUser, metadata: Metadata) -> None:
        self.path = path
        if Path(path).is_dir():
            raise HTTPFailure(400, f"path '{path}' is a directory")
        ensure_dirs(str(Path(path).parent), user)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        # Only a regular file may be unlinked on failure; never a device someone wrote to.
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        try:
            if not user.is_current:
                os.fchown(self._fd, user.uid, user.gid)
            self._store_metadata(metadata)
        except BaseException:
            self.discard()
            raise

    def _store_metadata(self, metadata: Metadata) -> None:
        # Before the body: a file whose metadata cannot be stored fails before the client
        # has sent all of it.
        try:
            replace_metadata(self._fd, metadata)
        except OSError as exc:
            raise _metadata_failure(exc, self.path) from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            exc.filename = self.path
            raise

    def close(self) -> None:
        os.close(self._fd)

    def discard(self) -> None:
        self.close()
        if self._regular:
            Path(self.path).unlink(missing_ok=True)


class _RawSink(_Sink):
    def __init__(self, path: str, user: SandboxUser, metadata: Metadata) -> None:
        self._path = path
        self._user = user
        self._metadata = metadata
        self._file: _OpenFile | None = None

    def _open(self) -> _OpenFile:
        if self._file is None:
            self._file = _OpenFile(self._path, self._user, self._metadata)
        return self._file

    def feed(self, chunk: bytes) -> None:
        self._open().write(chunk)

    def finish(self) -> list[str]:
        self._open().close()
        return [self._path]

    def abort(self) -> None:
        if self._file is not None:
            self._file.discard()


class _MultipartSink(_Sink):
    """Each `file` part goes to `?path=` when given, else to the part's filename (the SDK
    puts the full sandbox path there)."""

    def __init__(
        self, boundary: bytes, user: SandboxUser, query_path: str | None, metadata: Metadata
    ) -> None:
        self._user = user
        self._query_path = query_path
        self._metadata = metadata
        self._written: list[str] = []
        self._current: _OpenFile | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._parts = 0
        callbacks: dict[str, Callable[..., Any]] = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise HTTPFailure(400, f"malformed multipart body: {exc}") from None

    def finish(self) -> list[str]:
        try:
            self._parser.finalize()
        except FormParserError as exc:
            raise HTTPFailure(400, f"malformed multipart body: {exc}") from None
        if self._current is not None:
            raise HTTPFailure(400, "multipart body ended inside a part")
        return self._written

    def abort(self) -> None:
        if self._current is not None:
            self._current.discard()
            self._current = None

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise HTTPFailure(400, f"more than {MAX_PARTS} parts")
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]
        self._limit_header()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        self._limit_header()

    def _limit_header(self) -> None:
        if len(self._field) + len(self._value) > _MAX_PART_HEADER_BYTES:
            raise HTTPFailure(400, "multipart part header too large")

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        # Latin-1 round-trips the raw bytes: the SDK sends the path as raw UTF-8.
        disposition = self._headers.get(b"content-disposition", b"").decode("latin-1")
        _, params = parse_options_header(disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = _undo_form_escaping(params.get(b"filename", b"").decode("utf-8", "replace"))
        if name != "file" and not filename:
            return  # not a file: ignored, as envd does
        target = self._query_path or filename
        if not target:
            raise HTTPFailure(400, "a file part has no filename and there is no path parameter")
        self._current = _OpenFile(resolve_path(target, self._user), self._user, self._metadata)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.write(data[start:end])

    def _part_end(self) -> None:
        if self._current is not None:
            self._current.close()
            self._written.append(self._current.path)
            self._current = None


def _undo_form_escaping(filename: str) -> str:
    # httpx writes `"` in a filename as %22 (the HTML5 form rule).
    return filename.replace("%22", '"')


async def _receive(request: Request, sink: _Sink) -> list[str]:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip"):
        raise HTTPFailure(400, f"unsupported content encoding {encoding!r}")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if "gzip" in encoding else None

    def feed(chunk: bytes) -> None:
        if inflater is not None:
            try:
                chunk = inflater.decompress(chunk)
            except zlib.error as exc:
                raise HTTPFailure(400, f"invalid gzip body: {exc}") from None
        if chunk:
            sink.feed(chunk)

    def finish() -> list[str]:
        if inflater is not None and not inflater.eof:
            raise HTTPFailure(400, "truncated gzip body")
        return sink.finish()

    try:
        async for chunk in request.stream():
            if chunk:
                await _disk(feed, chunk)
        return await _disk(finish)
    except BaseException:
        await asyncio.to_thread(sink.abort)
        raise


async def _disk(func: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.to_thread(func, *args)
    except OSError as exc:
        raise _failure(exc) from None


def _metadata_failure(exc: OSError, path: str) -> HTTPFailure:
    if xattrs_unsupported(exc):
        return HTTPFailure(
            400,
            f"cannot store metadata on '{path}': its filesystem does not support user "
            "extended attributes",
        )
    # ext4 keeps a file's attributes in one block: some metadata within envd's 4096 bytes
    # is still too much for it, and it says ENOSPC although the disk has room.
    too_big = exc.errno in (errno.E2BIG, errno.ERANGE)
    if too_big or (exc.errno == errno.ENOSPC and _has_free_space(path)):
        return HTTPFailure(400, f"the metadata does not fit in the extended attributes of '{path}'")
    if exc.errno == errno.EPERM:
        # Devices, FIFOs and sockets take no user attributes.
        return HTTPFailure(400, f"cannot store metadata on '{path}': {exc.strerror}")
    exc.filename = path
    return _failure(exc)


def _has_free_space(path: str) -> bool:
    try:
        return os.statvfs(path).f_bavail > 0
    except OSError:
        return False


def _failure(exc: OSError) -> HTTPFailure:
    where = f" '{exc.filename}'" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HTTPFailure(507, f"not enough disk space to write{where}")
    if isinstance(exc, PermissionError):
        return HTTPFailure(403, f"permission denied{where}")
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        return HTTPFailure(400, f"{exc.strerror}{where}")
    return HTTPFailure(500, f"{exc.strerror or exc}{where}")
