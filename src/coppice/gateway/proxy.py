"""In-sandbox traffic: find the sandbox a request is for, check its access token, and relay
the request to the agent (or a user's server) inside it, streaming both ways.

A request names its sandbox either by the SDK's headers (`E2b-Sandbox-Id`,
`E2b-Sandbox-Port`) on the gateway's own origin, or by its host (`<port>-<id>.<domain>`)
for wildcard-DNS set-ups. Bodies are never buffered: Connect streams and NDJSON flush
message by message, and uploads stream into the sandbox.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from coppice.errors import SandboxUnreachable
from coppice.gateway.connect_stream import EnvelopeReader, end_stream_error, is_connect_stream
from coppice.store.records import HandedOut
from coppice.substrates.base import AGENT_PORT

log = logging.getLogger("coppice.gateway.relay")
INTERPRETER_PORT = 49999
#: headers that describe one hop, not the message; never forwarded
HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
#: asked when a relayed answer breaks mid-body: why, in words for the caller (None: unknown)
BreakExplainer = Callable[[], Awaitable[str | None]]
#: answer headers the gateway's own server sets; relaying the agent's as well repeats them
_OWN_HEADERS = frozenset({"date", "server"})
TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"  # noqa: S105 - a header name, not a secret
_HOST_ROUTE = re.compile(r"^(?P<port>\d{1,5})-(?P<id>[a-z0-9]+)\.(?P<domain>[^:]+)(?::\d+)?$")


@dataclass(frozen=True)
class Target:
    sandbox_id: str
    port: int


def target_of(headers: Mapping[str, str], domain: str) -> Target | None:
    """Which sandbox and port a request is meant for, or None if it is not in-sandbox traffic."""
    sandbox_id = headers.get("e2b-sandbox-id")
    if sandbox_id:
        raw_port = headers.get("e2b-sandbox-port", str(AGENT_PORT))
        return Target(sandbox_id, int(raw_port) if raw_port.isdigit() else -1)
    m = _HOST_ROUTE.match(headers.get("host", "").lower())
    if m and (not domain or m.group("domain") == domain.lower()):
        return Target(m.group("id"), int(m.group("port")))
    return None


def needs_token(target: Target, path: str, query: str = "") -> bool:
    if target.port == AGENT_PORT:
        # Presigned /files URLs carry a signature made with the token instead; the agent
        # checks it (it holds the token), so the gateway lets them through.
        return not (path == "/files" and "signature=" in query)
    # The interpreter SDK sends the token only on /execute; /contexts calls carry none.
    return target.port == INTERPRETER_PORT and path.startswith("/execute")


def token_ok(handed: HandedOut, request: Request) -> bool:
    presented = request.headers.get("x-access-token", "")
    return hmac.compare_digest(presented.encode(), handed.sandbox.access_token.encode())


def traffic_allowed(handed: HandedOut, target: Target, request: Request) -> bool:
    """A sandbox created with `allowPublicTraffic: false` opens its own ports (everything
    but envd's, which the access token guards) only to requests carrying its traffic token."""
    required = handed.sandbox.traffic_token
    if required is None or target.port == AGENT_PORT:
        return True
    presented = request.headers.get(TRAFFIC_TOKEN_HEADER, "")
    return hmac.compare_digest(presented.encode(), required.encode())


class SandboxProxy:
    """Relays requests into sandboxes over kept-alive connections, one pool per sandbox.

    Pools are per sandbox, not per address, because addresses are reused: a connection kept
    alive to a killed sandbox's IP would otherwise be handed to its successor and fail.
    """

    def __init__(self) -> None:
        self._clients: dict[str, httpx.AsyncClient] = {}

    def client(self, sandbox_id: str) -> httpx.AsyncClient:
        client = self._clients.get(sandbox_id)
        if client is None:
            # Plain HTTP on our own bridge: no TLS context (loading CAs costs ~50 ms), no
            # proxies from the environment. No read timeout: a command may stream for hours;
            # the SDK enforces its own deadlines.
            client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(
                    verify=False,
                    # The agent keeps idle connections 75 s; dropping ours first means we
                    # never reuse one it is closing.
                    limits=httpx.Limits(
                        max_connections=None, max_keepalive_connections=32, keepalive_expiry=30
                    ),
                ),
                timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=10.0),
                follow_redirects=False,
                trust_env=False,
            )
            self._clients[sandbox_id] = client
        return client

    async def forget(self, sandbox_id: str) -> None:
        client = self._clients.pop(sandbox_id, None)
        if client is not None:
            await client.aclose()

    async def prune(self, live: Callable[[str], bool]) -> None:
        for sandbox_id in [i for i in self._clients if not live(i)]:
            await self.forget(sandbox_id)

    async def aclose(self) -> None:
        for sandbox_id in list(self._clients):
            await self.forget(sandbox_id)

    async def relay(
        self,
        request: Request,
        handed: HandedOut,
        host: str,
        port: int,
        on_break: BreakExplainer | None = None,
    ) -> Response:
        url = httpx.URL(
            scheme="http",
            host=host,
            port=port,
            path=request.url.path,
            query=request.url.query.encode(),
        )
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k not in HOP_HEADERS and not k.startswith("e2b-sandbox-")
        ]
        body: bytes | AsyncIterator[bytes] | None
        length = request.headers.get("content-length")
        if length is None and "transfer-encoding" not in request.headers:
            body = None  # no body: a GET must not go upstream as an empty chunked one
        elif length is not None and int(length or 0) <= 1 << 20:
            body = await request.body()  # small: one write, and the agent sees its length
        else:
            body = request.stream()
        client = self.client(handed.sandbox.id)
        upstream_request = client.build_request(request.method, url, headers=headers, content=body)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.TransportError:
            # Refused, reset, or a kept-alive connection that died with its sandbox: the
            # caller finds out which (dead: "not found"; alive: the port is closed).
            raise SandboxUnreachable(handed.sandbox.id, port) from None
        response = RelayedResponse(handed.sandbox.id, upstream, on_break)
        # Verbatim, repeated headers included; the body is relayed undecoded, so its
        # Content-Encoding and Content-Length still hold.
        response.raw_headers = [
            (k, v)
            for k, v in upstream.headers.raw
            if k.lower().decode() not in HOP_HEADERS | _OWN_HEADERS
        ]
        return response


class _UpstreamBroke(Exception):
    pass


class RelayedResponse(StreamingResponse):
    """An answer streamed from inside a sandbox, which must never look more complete than it
    was: when the upstream breaks mid-body (the sandbox was killed or died), the client's
    connection is dropped without the final chunk, so its HTTP library raises a transport
    error, exactly as if it had been talking to the sandbox itself. The SDK turns that into
    "the sandbox was killed"; a clean end would read as a finished command or a whole file.

    The one exception is a Connect stream broken between two envelopes whose sandbox
    `on_break` finds dead: it ends with an error envelope saying why (an honest end: the
    SDK raises it as "sandbox not running", with the reason in its text).
    """

    def __init__(
        self, sandbox_id: str, upstream: httpx.Response, on_break: BreakExplainer | None = None
    ) -> None:
        super().__init__(self._body(), status_code=upstream.status_code)
        self.sandbox_id = sandbox_id
        self.upstream = upstream
        self.on_break = on_break
        plain = "content-encoding" not in upstream.headers
        connect = plain and is_connect_stream(upstream.headers.get("content-type", ""))
        self.envelopes = EnvelopeReader() if connect and on_break is not None else None

    async def _body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_raw():
                if self.envelopes is not None:
                    self.envelopes.feed(chunk)
                yield chunk
        except Exception as exc:  # any way the upstream can break: reset, closed by forget()
            broke = f"{type(exc).__name__}: {exc}"
            ending = await self._explained_end()
            if ending is None:
                raise _UpstreamBroke(broke) from None
            log.info("relay from sandbox %s broke (%s); ended saying why", self.sandbox_id, broke)
            yield ending

    async def _explained_end(self) -> bytes | None:
        if self.envelopes is None or self.on_break is None or not self.envelopes.can_end_with_error:
            return None
        why = await self.on_break()
        return None if why is None else end_stream_error(why)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except _UpstreamBroke as broke:
            # Returning with the response incomplete makes the server close the connection
            # mid-body (RFC 9112 §8: an incomplete message); raising would do the same with
            # a traceback in the log for what is an ordinary event.
            log.info("relay from sandbox %s broke mid-body: %s", self.sandbox_id, broke)
        finally:
            await self.upstream.aclose()


class SandboxDirectory:
    """Where each sandbox is, for the relay: a read-through cache over the store.

    Every in-sandbox request needs its sandbox's address and token. Reading them from SQLite
    each time is cheap but not free; entries are kept for `ttl_s` and dropped at once when
    this process kills, pauses or resumes the sandbox. A sandbox that died meanwhile is
    caught when the connection to it fails, so staleness costs nothing but that check.
    """

    def __init__(self, lookup: Callable[[str], HandedOut | None], ttl_s: float = 2.0) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, HandedOut]] = {}

    def get(self, sandbox_id: str) -> HandedOut | None:
        now = time.monotonic()
        hit = self._cache.get(sandbox_id)
        if hit is not None and now - hit[0] < self._ttl_s:
            return hit[1]
        found = self._lookup(sandbox_id)
        if found is None:
            self._cache.pop(sandbox_id, None)
        else:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[sandbox_id] = (now, found)
        return found

    def forget(self, sandbox_id: str) -> None:
        self._cache.pop(sandbox_id, None)
