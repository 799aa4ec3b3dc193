"""The HTTP forward proxy a template build reaches its package sources through, and nothing else.

It runs on an asyncio loop in a thread of the building process, bound to the host end of the
build's link. It serves the two forms package tools send a proxy: `CONNECT host:port` (a TLS
tunnel for https; the proxy never sees inside it) and absolute-URI `GET`/`HEAD http://...`
(apt fetches plain http through a proxy). A host:port that is not on the allow-list is refused
with a 403 that names the allowed ones and the setting that adds more, and no connection towards
it is made; names are resolved only after that check, on the host.

Both directions are framed by h11 (requests may be pipelined on one connection, and each is
checked on its own) and streamed in bounded chunks, each write awaited before the next read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable
from types import TracebackType
from urllib.parse import urlsplit

import h11

from coppice.errors import SubstrateError
from coppice.images.package_sources import ALLOWED_HOSTS_SETTING, normal_host

log = logging.getLogger("coppice.build.proxy")

CHUNK = 64 * 1024
MAX_HEAD = 32 * 1024
#: a build that holds a connection open without a request this long is not downloading
IDLE_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 256
_START_TIMEOUT_S = 10.0
_FORWARDED_METHODS = frozenset({b"GET", b"HEAD"})
#: headers about one hop (RFC 9110 7.6.1), never passed on; framing headers stay, since h11
#: re-frames each message from them
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    }
)

_Headers = list[tuple[bytes, bytes]]


class _Refusal(Exception):
    """A request answered by the proxy itself, with `status` and a plain-text reason."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class _Endpoint:
    """One side of a proxied exchange: its stream and the h11 state machine framing it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, as_server: bool
    ) -> None:
        self.reader = reader
        self.writer = writer
        role = h11.SERVER if as_server else h11.CLIENT
        self.h11 = h11.Connection(role, max_incomplete_event_size=MAX_HEAD)

    async def next_event(self) -> object:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.reader.read(CHUNK))

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.h11.send(event)
            if data:
                self.writer.write(data)
        await self.writer.drain()

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def close(self) -> None:
        self.writer.close()


class PackageProxy:
    """Start with `start()` or `with`; `url` is what build commands put in their *_proxy."""

    def __init__(
        self, allowed: Iterable[tuple[str, int]], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.allowed = frozenset((normal_host(h), p) for h, p in allowed)
        self.host = host
        self._wanted_port = port
        self._port: int | None = None
        #: requests answered 403 so far (read by tests; written only on the proxy's loop)
        self.refused = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._port is None:
            raise SubstrateError("the package proxy is not running; start() it first")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> PackageProxy:
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="package-proxy", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            self.stop()
            raise SubstrateError(f"the package proxy did not start on {self.host} in time")
        if self._failure is not None:
            self._thread.join()
            raise SubstrateError(
                f"cannot start the package proxy on {self.host}: {self._failure}"
            ) from self._failure
        return self

    def stop(self) -> None:
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stopping.set)
        if thread is not None:
            thread.join(_START_TIMEOUT_S)
        self._thread = None
        self._loop = None
        self._port = None

    def __enter__(self) -> PackageProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- on the proxy's loop --------------------------------------------------------------

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(
                self._on_connection, self.host, self._wanted_port, limit=CHUNK
            )
        except OSError as exc:
            self._failure = exc
            self._ready.set()
            return
        self._port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections.add(task)
        client = _Endpoint(reader, writer, as_server=True)
        upstreams: dict[tuple[str, int], _Endpoint] = {}
        try:
            await self._serve(client, upstreams)
        except (ConnectionError, TimeoutError, OSError, h11.ProtocolError):
            pass  # the build, or the package source, went away mid-exchange
        finally:
            self._connections.discard(task)
            for upstream in upstreams.values():
                upstream.close()
            client.close()

    async def _serve(self, client: _Endpoint, upstreams: dict[tuple[str, int], _Endpoint]) -> None:
        while True:
            try:
                event = await asyncio.wait_for(client.next_event(), IDLE_TIMEOUT_S)
            except h11.RemoteProtocolError as exc:
                await _answer_if_possible(
                    client, 400, f"not an HTTP request this proxy reads: {exc}\n"
                )
                return
            if not isinstance(event, h11.Request):
                return  # the build closed the connection
            try:
                if event.method == b"CONNECT":
                    await self._tunnel(client, event)
                    return
                await self._forward(client, event, upstreams)
            except _Refusal as refusal:
                await _drain_request(client)
                head = event.method == b"HEAD"
                await _answer_if_possible(client, refusal.status, refusal.text, head)
            if not client.reusable():
                return
            client.h11.start_next_cycle()

    def _check(self, request: h11.Request, host: str, port: int) -> None:
        if (host, port) in self.allowed:
            return
        self.refused += 1
        method = request.method.decode(errors="replace")
        log.warning(
            "build proxy refused %s %s:%d: not a package source of this host", method, host, port
        )
        allowed = ", ".join(f"{h}:{p}" for h, p in sorted(self.allowed)) or "none"
        raise _Refusal(
            403,
            f"{host}:{port} is not a package source of this host. A template build reaches only "
            f"the package sources the host is configured with: {allowed}. To allow another, add "
            f"it to the {ALLOWED_HOSTS_SETTING} setting (HOST or HOST:PORT, comma-separated) in "
            f"/etc/coppice/config.toml or COPPICE_{ALLOWED_HOSTS_SETTING.upper()}.\n",
        )

    async def _tunnel(self, client: _Endpoint, request: h11.Request) -> None:
        host, port = _authority(request.target)
        self._check(request, host, port)
        reader, writer = await _open(host, port)
        try:
            await _drain_request(client)
            await client.send(
                h11.Response(status_code=200, headers=[], reason=b"Connection established")
            )
            early, _closed = client.h11.trailing_data
            if early:
                writer.write(early)
            await _splice(client.reader, client.writer, reader, writer)
        finally:
            writer.close()

    async def _forward(
        self,
        client: _Endpoint,
        request: h11.Request,
        upstreams: dict[tuple[str, int], _Endpoint],
    ) -> None:
        if request.method not in _FORWARDED_METHODS:
            raise _Refusal(
                405,
                "the build proxy passes on only GET and HEAD (package downloads) and CONNECT "
                "(https tunnels)\n",
            )
        host, port, origin_form, authority = _absolute_http(request.target)
        self._check(request, host, port)
        # Held whole (GET and HEAD carry none in practice), so the request can be sent again.
        body = await _request_body(client)
        key = (host, port)
        headers = [(b"host", authority), *_end_to_end(request.headers, drop=(b"host",))]
        forwarded = h11.Request(method=request.method, target=origin_form, headers=headers)
        for _attempt in range(2):
            upstream = upstreams.pop(key, None)
            kept_alive = upstream is not None and upstream.h11.our_state is h11.IDLE
            if upstream is None or not kept_alive:
                if upstream is not None:
                    upstream.close()
                upstream = _Endpoint(*await _open(host, port), as_server=False)
            try:
                await _send_request(upstream, forwarded, body)
                await _relay_response(upstream, client, f"{host}:{port}")
            except _NoAnswer as exc:
                upstream.close()
                if kept_alive:
                    continue  # the source had closed the idle connection: once more, anew
                raise _Refusal(502, f"{host}:{port} sent no answer: {exc}\n") from exc
            except BaseException:
                upstream.close()
                raise
            if upstream.reusable():
                upstream.h11.start_next_cycle()
                upstreams[key] = upstream
            else:
                upstream.close()
            return


class _NoAnswer(Exception):
    """The package source closed or broke the connection before answering a request."""


async def _request_body(client: _Endpoint) -> bytes:
    body = b""
    while True:
        event = await client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_HEAD:
                raise _Refusal(413, "a package download request has no body this large\n")
        elif isinstance(event, h11.EndOfMessage):
            return body
        else:
            raise ConnectionError("the build closed the connection mid-request")


async def _send_request(upstream: _Endpoint, request: h11.Request, body: bytes) -> None:
    events: list[h11.Event] = [request]
    if body:
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    try:
        await upstream.send(*events)
    except (ConnectionError, OSError) as exc:
        raise _NoAnswer(str(exc) or type(exc).__name__) from exc


async def _relay_response(upstream: _Endpoint, client: _Endpoint, where: str) -> None:
    answered = False
    while True:
        try:
            event = await upstream.next_event()
        except (ConnectionError, OSError, h11.RemoteProtocolError) as exc:
            if not answered:
                raise _NoAnswer(str(exc) or type(exc).__name__) from exc
            raise
        if isinstance(event, h11.Response):
            answered = True
            await client.send(
                h11.Response(
                    status_code=event.status_code,
                    headers=_end_to_end(event.headers),
                    reason=event.reason,
                )
            )
        elif isinstance(event, h11.Data):
            await client.send(h11.Data(data=event.data))
        elif isinstance(event, h11.EndOfMessage):
            await client.send(h11.EndOfMessage())
            return
        elif isinstance(event, h11.ConnectionClosed):
            if not answered:
                raise _NoAnswer("it closed the connection")
            raise ConnectionError(f"{where} closed the connection mid-response")
        # an informational (1xx) answer is about this hop only: the proxy waits for the real one


def _end_to_end(headers: Iterable[tuple[bytes, bytes]], drop: Iterable[bytes] = ()) -> _Headers:
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    skip = _HOP_BY_HOP | named | set(drop)
    return [(name, value) for name, value in pairs if name.lower() not in skip]


def _authority(target: bytes) -> tuple[str, int]:
    """`host:port` of a CONNECT, the port required."""
    try:
        split = urlsplit(f"//{target.decode('ascii')}")
        host, port = split.hostname, split.port
    except (UnicodeDecodeError, ValueError):
        host, port = None, None
    if not host or not port or split.path:
        raise _Refusal(400, "CONNECT needs HOST:PORT, e.g. CONNECT pypi.org:443\n")
    return normal_host(host), port


def _absolute_http(target: bytes) -> tuple[str, int, bytes, bytes]:
    """Host, port, origin-form target and Host header of an absolute `http://` URI."""
    try:
        split = urlsplit(target.decode("ascii"))
        host, port = split.hostname, split.port or 80
    except (UnicodeDecodeError, ValueError):
        host, port = None, 80
    if split.scheme.lower() == "https":
        raise _Refusal(400, "send https through the proxy as CONNECT HOST:443, not as a GET\n")
    if split.scheme.lower() != "http" or not host:
        raise _Refusal(
            400, "this is a forward proxy: send an absolute URI (GET http://HOST/PATH)\n"
        )
    origin = split.path or "/"
    if split.query:
        origin += "?" + split.query
    return normal_host(host), port, origin.encode("ascii"), split.netloc.encode("ascii")


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=CHUNK), CONNECT_TIMEOUT_S
        )
    except TimeoutError as exc:
        raise _Refusal(504, f"{host}:{port} did not answer in {CONNECT_TIMEOUT_S:.0f} s\n") from exc
    except OSError as exc:
        raise _Refusal(502, f"cannot reach {host}:{port}: {exc.strerror or exc}\n") from exc


async def _drain_request(client: _Endpoint) -> None:
    """Read the rest of a request (normally just its end): h11 answers only after it."""
    while client.h11.their_state is h11.SEND_BODY:
        event = await client.next_event()
        if isinstance(event, h11.ConnectionClosed):
            return


async def _answer_if_possible(
    client: _Endpoint, status: int, text: str, head: bool = False
) -> None:
    """Answer from the proxy itself, when the exchange still allows an answer; a request not
    read to its end ends its connection, since what follows it cannot be told apart."""
    if client.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    if client.h11.their_state is not h11.DONE:
        headers.append((b"connection", b"close"))
    events: list[h11.Event] = [h11.Response(status_code=status, headers=headers)]
    if not head:  # a HEAD answer has its body's length but never the body
        events.append(h11.Data(data=body))
    events.append(h11.EndOfMessage())
    await client.send(*events)


async def _splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until both sides are done; an error on either ends both."""
    tasks = [
        asyncio.create_task(_pipe(a_reader, b_writer)),
        asyncio.create_task(_pipe(b_reader, a_writer)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    # pass the half-close on: the other side may still have an answer to send
    if writer.can_write_eof():
        writer.write_eof()
