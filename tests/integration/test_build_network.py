"""A template build's network, for real: from inside its namespace the package proxy passes on
requests to an allowed host, and nothing else on the host answers; nothing is left behind, even
by a build killed with SIGKILL.

Every packet goes to an address this test made: a test server on the host's loopback (the
allowed "package source"), servers on the build link's host end and on a spare link of the
test's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import os
import re
import secrets
import signal
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from coppice.config import Settings
from coppice.errors import Conflict
from coppice.net.build_link import (
    BuildNetwork,
    host_link_name,
    leftover_build_networks,
    remove_build_network,
    short_id,
    table_name,
)

pytestmark = pytest.mark.integration

#: an address of the benchmarking range (RFC 2544) on a link the test makes: "some other
#: address of the host", which a build must not reach either
OTHER_HOST_ADDRESS = "198.18.79.1"


class _Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"package index {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Bystander(socketserver.BaseRequestHandler):
    """A host service the build must not reach; counts whoever got through."""

    accepted = 0

    def handle(self) -> None:
        type(self).accepted += 1
        self.request.sendall(b"reached\n")


@contextlib.contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[int]:
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


@contextlib.contextmanager
def _bystander(address: str) -> Iterator[int]:
    server = socketserver.ThreadingTCPServer((address, 0), _Bystander)
    server.daemon_threads = True
    with _serving(server) as port:
        yield port


@contextlib.contextmanager
def _spare_link(address: str) -> Iterator[None]:
    # a veth pair wholly on the host: this kernel may lack the dummy link type
    name = f"copptd{secrets.token_hex(3)}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"})
        try:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=idx, address=address, prefixlen=32)
            ipr.link("set", index=idx, state="up")
            yield
        finally:
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])


@pytest.fixture(scope="module")
def index_port() -> Iterator[int]:
    """The allowed package source: an HTTP server on the host's loopback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    server.daemon_threads = True
    with _serving(server) as port:
        yield port


@pytest.fixture()
def build_settings(settings: Settings, index_port: int) -> Settings:
    return dataclasses.replace(settings, build_allowed_hosts=f"127.0.0.1:{index_port}")


def _inside(net: BuildNetwork, code: str) -> str:
    done = subprocess.run(
        ["nsenter", f"--net={net.netns_path}", "--", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _through_proxy(net: BuildNetwork, url: str) -> str:
    """A GET through the proxy from inside the build, as apt sends it; prints the answer."""
    host, port = net.proxy_url.removeprefix("http://").rsplit(":", 1)
    return _inside(
        net,
        f"""
        import socket
        with socket.create_connection(({host!r}, {port}), timeout=10) as s:
            s.sendall(b"GET {url} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        print(answer.decode())
        """,
    )


def _connect_directly(net: BuildNetwork, address: str, port: int) -> str:
    """`connected`, `refused` or `timeout` for a plain TCP connection from inside the build."""
    return _inside(
        net,
        f"""
        import socket
        try:
            socket.create_connection(({address!r}, {port}), timeout=2).close()
            print("connected")
        except ConnectionRefusedError:
            print("refused")
        except TimeoutError:
            print("timeout")
        except OSError as exc:
            print("unreachable", exc)
        """,
    ).strip()


def _gone(settings: Settings, net: BuildNetwork) -> None:
    assert not net.netns_path.exists()
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=net.host_link)
    listed = subprocess.run(
        ["nft", "list", "table", "inet", net.table], capture_output=True, check=False
    )
    assert listed.returncode != 0, f"nft table {net.table} is still there"
    assert net.name not in leftover_build_networks(settings)


def test_a_build_reaches_only_the_proxy_and_only_allowed_hosts_through_it(
    build_settings: Settings, index_port: int
) -> None:
    net = BuildNetwork(build_settings, f"it-{secrets.token_hex(4)}")
    with (
        net,
        _bystander(net.host_address) as link_port,
        _spare_link(OTHER_HOST_ADDRESS),
        _bystander(OTHER_HOST_ADDRESS) as other_port,
    ):
        # Both bystanders answer the host itself: what stops the build below is its firewall.
        for address, port in ((net.host_address, link_port), (OTHER_HOST_ADDRESS, other_port)):
            with socket.create_connection((address, port), timeout=5) as sock:
                assert sock.recv(64) == b"reached\n"
        before = _Bystander.accepted
        answer = _through_proxy(net, f"http://127.0.0.1:{index_port}/simple/six/")
        assert answer.startswith("HTTP/1.1 200 "), answer
        assert answer.endswith("package index /simple/six/\n")

        # Not through the proxy: dropped on the host (a timeout, not a refusal), for the
        # link's own host address and for every other one.
        assert _connect_directly(net, net.host_address, link_port) == "timeout"
        assert _connect_directly(net, OTHER_HOST_ADDRESS, other_port) == "timeout"
        # The build's loopback is its own, not the host's.
        assert _connect_directly(net, "127.0.0.1", index_port) == "refused"

        # Through the proxy, but not a package source: refused, never connected.
        refused = _through_proxy(net, f"http://{net.host_address}:{link_port}/")
        assert refused.startswith("HTTP/1.1 403 "), refused
        assert f"127.0.0.1:{index_port}" in refused
        assert "build_allowed_hosts" in refused
        assert _Bystander.accepted == before

        ruleset = subprocess.run(
            ["nft", "list", "table", "inet", net.table],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        dropped = re.search(r"chain input \{.*?counter packets (\d+)", ruleset, re.DOTALL)
        assert dropped is not None and int(dropped.group(1)) > 0, ruleset
        assert f'oifname "{net.host_link}"' in ruleset  # forwarding both ways is closed too
    _gone(build_settings, net)


def test_the_network_goes_when_the_build_fails(build_settings: Settings) -> None:
    net = BuildNetwork(build_settings, f"it-{secrets.token_hex(4)}")
    with pytest.raises(RuntimeError, match="the step failed"), net:
        assert net.netns_path.exists()
        raise RuntimeError("the step failed")
    _gone(build_settings, net)


def test_a_killed_builds_network_is_swept_and_a_running_one_is_not(
    settings: Settings, config_file: Path
) -> None:
    build_id = f"it-crash-{secrets.token_hex(4)}"
    short = short_id(settings, build_id)
    script = textwrap.dedent(
        f"""
        import sys, time
        from coppice.config import Settings
        from coppice.net.build_link import BuildNetwork
        net = BuildNetwork(Settings.load(), {build_id!r}).__enter__()
        print(net.name, flush=True)
        time.sleep(120)
        """
    )
    env = {**os.environ, "COPPICE_CONFIG": str(config_file)}
    child = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        name = child.stdout.readline().strip()
        assert name == f"{settings.namespace}-b{short}", "the build network did not come up"
        assert name not in leftover_build_networks(settings)
        with pytest.raises(Conflict):
            remove_build_network(settings, name)

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert Path("/run/netns", name).exists()  # what a crash leaves
        assert name in leftover_build_networks(settings)
        remove_build_network(settings, name)
        assert leftover_build_networks(settings) == []
        assert not Path("/run/netns", name).exists()
        with IPRoute() as ipr:
            assert not ipr.link_lookup(ifname=host_link_name(short))
        table = table_name(settings, short)
        listed = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True)
        assert listed.returncode != 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        with contextlib.suppress(Exception):
            remove_build_network(settings, f"{settings.namespace}-b{short}")
