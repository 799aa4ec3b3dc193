"""The sandboxes' resolver: a DNS forwarder on a bridge's gateway address (UDP and TCP, port
53) that enforces domain rules, in a thread of its own with its own event loop.

Every sandbox's /etc/resolv.conf names it. For each query it asks `policy_of` what the sender
may reach: a sandbox that may not reach the internet gets answers only for its allowed domains
(REFUSED for the rest, so its queries carry nothing out), and the IPv4 addresses answered for
an allowed domain are pinned into the sandbox's allow set (`pin`) before the answer leaves,
so the connection that follows the answer finds its way open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from coppice.egress_policy import EgressPolicy
from coppice.errors import CoppiceError, SubstrateError

log = logging.getLogger("coppice.resolver")

DNS_PORT = 53
UPSTREAM_TIMEOUT_S = 3.0
#: the most a plain UDP answer may carry (RFC 1035); EDNS callers say how much they take
PLAIN_UDP_LIMIT = 512


def host_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """The IPv4 name servers the host itself uses."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
            found.append(parts[1])
    return found


def upstreams_from(setting: str) -> list[str]:
    listed = [part.strip() for part in setting.split(",") if part.strip()]
    return listed or host_upstreams()


PolicyOf = Callable[[str], EgressPolicy]
Pin = Callable[[str, Iterable[str]], None]


class SandboxResolver:
    def __init__(self, listen: str, upstreams: list[str], policy_of: PolicyOf, pin: Pin) -> None:
        self.listen = listen
        self.upstreams = upstreams
        self.policy_of = policy_of
        self.pin = pin
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listening once this returns; SubstrateError when the address cannot be bound."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(started, failure))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"resolver {self.listen}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            raise SubstrateError(
                f"the sandboxes' resolver cannot listen on {self.listen}:{DNS_PORT}: "
                f"{failure[0]}; stop whatever holds that port (a dnsmasq on 0.0.0.0?)"
            )

    def stop(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=5)

    async def _serve(self, started: threading.Event, failure: list[BaseException]) -> None:
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self), local_addr=(self.listen, DNS_PORT)
            )
            tcp = await asyncio.start_server(self._stream, self.listen, DNS_PORT)
        except OSError as exc:
            failure.append(exc)
            started.set()
            return
        started.set()
        try:
            await self._stopped.wait()
        finally:
            udp.close()
            tcp.close()
            await tcp.wait_closed()

    # -- one query --------------------------------------------------------------------------

    async def answer(self, wire: bytes, source: str, limit: int | None) -> bytes | None:
        """The answer to one query from `source`, sized for UDP when `limit` is given; None
        for what is no query at all."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return _reply(query, dns.rcode.FORMERR).to_wire()
        name = query.question[0].name.to_text(omit_final_dot=True)
        try:
            policy = await asyncio.to_thread(self.policy_of, source)
        except CoppiceError as exc:
            log.warning("no policy for %s: %s", source, exc)
            return _reply(query, dns.rcode.SERVFAIL).to_wire()
        if not policy.answers_name(name):
            return _reply(query, dns.rcode.REFUSED).to_wire()
        response = await self._forward(query)
        if response is None:
            return _reply(query, dns.rcode.SERVFAIL).to_wire()
        if policy.pins_name(name):
            addresses = [
                rr.address
                for rrset in response.answer
                if rrset.rdtype == dns.rdatatype.A
                for rr in rrset
            ]
            if addresses:
                try:
                    await asyncio.to_thread(self.pin, source, addresses)
                except CoppiceError as exc:
                    log.warning("cannot pin %s for %s: %s", addresses, source, exc)
                    return _reply(query, dns.rcode.SERVFAIL).to_wire()
        return _sized(response, limit, query)

    async def _forward(self, query: dns.message.Message) -> dns.message.Message | None:
        for upstream in self.upstreams:
            try:
                response = await dns.asyncquery.udp(query, upstream, timeout=UPSTREAM_TIMEOUT_S)
                if response.flags & dns.flags.TC:
                    response = await dns.asyncquery.tcp(query, upstream, timeout=UPSTREAM_TIMEOUT_S)
                return response
            except (dns.exception.DNSException, OSError) as exc:
                log.info("upstream %s failed: %s", upstream, exc)
        return None

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str(writer.get_extra_info("peername")[0])
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                wire = await reader.readexactly(length)
                out = await self.answer(wire, source, None)
                if out is None:
                    break
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, resolver: SandboxResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (not every loop's class says so by inheritance).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        asyncio.get_running_loop().create_task(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[str | object, int]) -> None:
        out = await self.resolver.answer(data, str(addr[0]), PLAIN_UDP_LIMIT)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response


def _sized(response: dns.message.Message, limit: int | None, query: dns.message.Message) -> bytes:
    """As much as the asker's UDP buffer takes; truncated (it retries over TCP) if more."""
    if limit is None:
        return response.to_wire()
    if query.edns >= 0:
        limit = max(limit, query.payload)
    wire = response.to_wire()
    if len(wire) <= limit:
        return wire
    truncated = dns.message.make_response(query)
    truncated.flags |= dns.flags.TC
    return truncated.to_wire()
