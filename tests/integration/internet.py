"""A made-up internet for egress tests: a network namespace on TEST-NET addresses with two web
servers, a DNS zone, a "metadata service" on 169.254.169.254 and a host on a private network,
reached from the host through one veth.

The test instance's `egress_interface` setting names that veth, so the instance's sandboxes
can leave the machine by no other way, whatever they run. Each test instance
(COPPICE_TEST_INSTANCE) takes its own /28 of each TEST-NET range, so instances can coexist.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

_K = int(os.environ.get("COPPICE_TEST_INSTANCE", "") or 0)

#: the host end of the link; the instance's egress_interface
HOST_LINK = f"coppinet{_K}"
_BASE = 16 * _K
HOST_ADDRESS = f"198.51.100.{_BASE + 1}"
WORLD_ADDRESS = f"198.51.100.{_BASE + 2}"
DNS_SERVER = f"198.51.100.{_BASE + 3}"
WEB_A = f"203.0.113.{_BASE + 10}"
WEB_B = f"203.0.113.{_BASE + 11}"
METADATA = "169.254.169.254"
PRIVATE_HOST = f"10.99.{_K}.99"
#: names the zone answers
ZONE = {
    "www.example.test": WEB_A,
    "other.example.test": WEB_B,
    "api.allowed.test": WEB_A,
}

_SERVERS = textwrap.dedent(
    """
    import socketserver, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import dns.message, dns.rcode, dns.rrset

    zone = dict(arg.split("=") for arg in sys.argv[2:])

    class Web(BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello from {self.server.server_address[0]}\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass

    class Dns(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            query = dns.message.from_wire(data)
            answer = dns.message.make_response(query)
            name = query.question[0].name.to_text(omit_final_dot=True)
            if name in zone and query.question[0].rdtype == 1:
                answer.answer.append(dns.rrset.from_text(name + ".", 30, "IN", "A", zone[name]))
            elif name not in zone:
                answer.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(answer.to_wire(), self.client_address)

    web_addresses = sys.argv[1].split(",")
    servers = [ThreadingHTTPServer((a, 80), Web) for a in web_addresses[1:]]
    servers.append(socketserver.ThreadingUDPServer((web_addresses[0], 53), Dns))
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    """
)


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    subprocess.run(argv, check=True, capture_output=True, text=True)


@dataclass
class TestInternet:
    __test__ = False  # not a test class, whatever its name
    netns: str
    servers: subprocess.Popen[str] | None = None

    def start(self) -> TestInternet:
        self.stop()  # what a crashed run left
        _ip("netns", "add", self.netns)
        try:
            _ip(
                "link",
                "add",
                HOST_LINK,
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                self.netns,
            )
            _ip("addr", "add", f"{HOST_ADDRESS}/28", "dev", HOST_LINK)
            _ip("link", "set", HOST_LINK, "up")
            ns = self.netns
            _ip("addr", "add", f"{WORLD_ADDRESS}/28", "dev", "uplink", netns=ns)
            _ip("addr", "add", f"{DNS_SERVER}/28", "dev", "uplink", netns=ns)
            _ip("link", "set", "uplink", "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
            for address in (WEB_A, WEB_B, METADATA, PRIVATE_HOST):
                _ip("addr", "add", f"{address}/32", "dev", "lo", netns=ns)
                _ip("route", "add", f"{address}/32", "via", WORLD_ADDRESS, "dev", HOST_LINK)
            _ip("route", "add", "default", "via", HOST_ADDRESS, netns=ns)
            zone = [f"{name}={address}" for name, address in ZONE.items()]
            web = ",".join([DNS_SERVER, WEB_A, WEB_B, METADATA, PRIVATE_HOST])
            self.servers = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", _SERVERS, web, *zone],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert self.servers.stdout is not None
            line = self.servers.stdout.readline()
            if line.strip() != "ready":
                err = self.servers.stderr.read() if self.servers.stderr else ""
                raise RuntimeError(f"the test internet did not start: {err}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.servers is not None:
            self.servers.send_signal(signal.SIGTERM)
            try:
                self.servers.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.servers.kill()
                self.servers.wait()
            self.servers = None
        # The veth (and the host routes through it) goes with the namespace.
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", HOST_LINK)
        if Path("/run/netns", self.netns).exists():
            _ip("netns", "del", self.netns)
        deadline = time.monotonic() + 5
        while Path("/sys/class/net", HOST_LINK).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
