"""The build's package proxy on loopback: allowed hosts are passed on (absolute-URI GET and
HEAD, CONNECT tunnels), anything else gets a 403 and no connection at all."""

from __future__ import annotations

import http.client
import http.server
import logging
import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from coppice.net.package_proxy import PackageProxy

BIG = bytes(range(256)) * 20_000  # 5 MB: more than any buffer on the way holds at once


class _Index(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/big":
            body = BIG
            self.send_response(200)
            # no Content-Length: chunked, re-framed by the proxy for its own client
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 100_000):
                piece = body[start : start + 100_000]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        body = f"package index at {self.path}; host header {self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _OneAnswerEach(socketserver.BaseRequestHandler):
    """Answers one request per connection and hangs up without saying so, as a source whose
    keep-alive timeout ran out between two requests does."""

    accepted = 0

    def handle(self) -> None:
        type(self).accepted += 1
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            head += chunk
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class _Silent(socketserver.BaseRequestHandler):
    accepted = 0

    def handle(self) -> None:
        type(self).accepted += 1


def _serve(server: socketserver.BaseServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        address = server.server_address
        assert isinstance(address, tuple)
        yield int(address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def index_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    server.daemon_threads = True
    yield from _serve(server)


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    yield from _serve(server)


@pytest.fixture(scope="module")
def forbidden_port() -> Iterator[int]:
    """Listening, so that a connection to it would be seen; never on the allow-list."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Silent)
    server.daemon_threads = True
    yield from _serve(server)


@pytest.fixture(scope="module")
def hang_up_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _OneAnswerEach)
    server.daemon_threads = True
    yield from _serve(server)


@pytest.fixture()
def proxy(index_port: int, echo_port: int) -> Iterator[PackageProxy]:
    with PackageProxy({("127.0.0.1", index_port), ("127.0.0.1", echo_port)}) as running:
        yield running


def _via(proxy: PackageProxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)


def test_absolute_uri_get_and_head_reach_an_allowed_host(
    proxy: PackageProxy, index_port: int
) -> None:
    assert proxy.url == f"http://127.0.0.1:{proxy.port}"
    conn = _via(proxy)
    try:
        url = f"http://127.0.0.1:{index_port}/debian/dists/bookworm/Release?x=1"
        conn.request("GET", url, headers={"Proxy-Connection": "keep-alive"})
        answer = conn.getresponse()
        assert answer.status == 200
        assert (
            answer.read()
            == (
                f"package index at /debian/dists/bookworm/Release?x=1; "
                f"host header 127.0.0.1:{index_port}"
            ).encode()
        )
        # the same connection again (apt keeps one per proxy): a HEAD, with no body back
        conn.request("HEAD", f"http://127.0.0.1:{index_port}/pool/a.deb")
        head = conn.getresponse()
        assert head.status == 200
        assert int(head.headers["Content-Length"]) > 0
        assert head.read() == b""
    finally:
        conn.close()
    assert proxy.refused == 0


def test_a_large_chunked_download_streams_through_whole(
    proxy: PackageProxy, index_port: int
) -> None:
    conn = _via(proxy)
    try:
        conn.request("GET", f"http://127.0.0.1:{index_port}/big")
        answer = conn.getresponse()
        assert answer.status == 200
        assert answer.read() == BIG
    finally:
        conn.close()


def test_pipelined_requests_are_each_answered_in_order(
    proxy: PackageProxy, index_port: int
) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        requests = b"".join(
            f"GET http://127.0.0.1:{index_port}/{name} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{index_port}\r\n\r\n".encode()
            for name in ("first", "second")
        )
        sock.sendall(requests + b"GET http://blocked.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while received.count(b"HTTP/1.1 ") < 3 or not received.endswith(
            b"COPPICE_BUILD_ALLOWED_HOSTS.\n"
        ):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.index(b"/first;") < received.index(b"/second;") < received.index(b" 403 ")


def test_connect_tunnels_to_an_allowed_host(proxy: PackageProxy, echo_port: int) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        # bytes right behind the request head (a TLS ClientHello, normally) must not be lost
        sock.sendall(
            f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: 127.0.0.1:{echo_port}\r\n\r\n"
            "early bytes;".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"then more")
        echoed = b""
        while len(echoed) < len(b"early bytes;then more"):
            echoed += sock.recv(65536)
        assert echoed == b"early bytes;then more"


def test_a_host_not_on_the_list_gets_403_and_no_connection(
    proxy: PackageProxy, forbidden_port: int, index_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="coppice.build.proxy")
    before = _Silent.accepted
    conn = _via(proxy)
    try:
        conn.request("GET", f"http://127.0.0.1:{forbidden_port}/simple/requests/")
        answer = conn.getresponse()
        body = answer.read().decode()
        assert answer.status == 403
        assert f"127.0.0.1:{forbidden_port} is not a package source" in body
        assert f"127.0.0.1:{index_port}" in body  # names what is allowed
        assert "build_allowed_hosts" in body  # and how to add one
        # the connection stays usable for allowed requests after a refusal
        conn.request("GET", f"http://127.0.0.1:{index_port}/after")
        assert conn.getresponse().read().startswith(b"package index at /after")
    finally:
        conn.close()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{forbidden_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 403 ")
    assert proxy.refused == 2
    assert _Silent.accepted == before
    refusals = [r.getMessage() for r in caplog.records if r.name == "coppice.build.proxy"]
    reason = "not a package source of this host"
    assert refusals == [
        f"build proxy refused GET 127.0.0.1:{forbidden_port}: {reason}",
        f"build proxy refused CONNECT 127.0.0.1:{forbidden_port}: {reason}",
    ]


def test_a_kept_alive_connection_the_source_closed_is_tried_anew(hang_up_port: int) -> None:
    with PackageProxy({("127.0.0.1", hang_up_port)}) as proxy:
        conn = _via(proxy)
        try:
            for _ in range(3):
                conn.request("GET", f"http://127.0.0.1:{hang_up_port}/Packages")
                answer = conn.getresponse()
                assert (answer.status, answer.read()) == (200, b"ok")
        finally:
            conn.close()
    assert _OneAnswerEach.accepted == 3


def test_what_a_forward_proxy_does_not_serve(proxy: PackageProxy, index_port: int) -> None:
    cases = [
        ("POST", f"http://127.0.0.1:{index_port}/upload", 405),
        ("GET", "/relative/path", 400),
        ("GET", f"https://127.0.0.1:{index_port}/", 400),
    ]
    for method, target, status in cases:
        conn = _via(proxy)
        try:
            conn.request(method, target, body=b"x" if method == "POST" else None)
            assert conn.getresponse().status == status, (method, target)
        finally:
            conn.close()


def test_a_request_that_is_not_http_is_answered_400(proxy: PackageProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 this is TLS, not a proxy request\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")


def test_stop_ends_open_tunnels_and_frees_the_port(echo_port: int) -> None:
    proxy = PackageProxy({("127.0.0.1", echo_port)}).start()
    port = proxy.port
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        proxy.stop()
        assert sock.recv(65536) == b""  # closed by the proxy, not left hanging
    finally:
        sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
