"""The gateway app over the fake substrate, seen from HTTP: `GET /metrics` (who may scrape,
what it says, parsed with Prometheus's own parser) and what a dead sandbox's owner is told by
the control plane and by in-sandbox traffic."""

from __future__ import annotations

import asyncio
import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from coppice.errors import PoolExhausted
from coppice.gateway.app import GatewayApp, build_gateway
from coppice.gateway.auth import DEFAULT_TENANT
from coppice.gateway.wire import CreateRequest
from coppice.store.records import HandedOut

from .fake_pool import TEMPLATE, FakePool, fake_pool, tenant
from .test_relay_fake import agent  # noqa: F401 - the loopback agent fixture

OPS_KEY = "ops-key"
TENANT_KEY = "tenant-key"
KEYS = f"{OPS_KEY},acme:{TENANT_KEY}:create|read|manage"


def _closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Gw:
    def __init__(self, pool: FakePool, app: GatewayApp) -> None:
        self.pool = pool
        self.app = app

    def create(self, who: str = DEFAULT_TENANT) -> HandedOut:
        req = CreateRequest(TEMPLATE, 300, {}, {}, "kill", False)
        handed, _ = self.app.gateway.service.create(req, tenant(who), None)
        return handed

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                try:
                    return await client.request(method, url, **kwargs)  # type: ignore[arg-type]
                finally:
                    await self.app.gateway.proxy.aclose()

        return asyncio.run(go())

    def scrape(self, key: str = OPS_KEY) -> dict[str, list[Sample]]:
        answer = self.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        return {f.name: f.samples for f in text_string_to_metric_families(answer.text)}


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    labels = {"template": TEMPLATE, **labels}
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name} {labels} in {samples}")


def _gateway(tmp_path: Path, **settings: str) -> Gw:
    pool = fake_pool(tmp_path, None, **settings)
    pool.fake.agent = ("127.0.0.1", _closed_port())
    return Gw(pool, build_gateway(pool.settings, pool.controller))


@pytest.fixture()
def gw(tmp_path: Path) -> Iterator[Gw]:
    g = _gateway(tmp_path, COPPICE_API_KEYS=KEYS)
    yield g
    g.app.gateway.keeper.stop()


# -- /metrics ---------------------------------------------------------------------------------


def test_metrics_need_the_metrics_scope(gw: Gw) -> None:
    assert gw.request("GET", "/metrics").status_code == 401
    tenant_answer = gw.request("GET", "/metrics", headers={"X-API-Key": TENANT_KEY})
    assert tenant_answer.status_code == 403 and "'metrics' scope" in tenant_answer.json()["message"]
    gw.scrape(OPS_KEY)  # a bare key has every scope


def test_metrics_count_what_the_pool_and_service_did(
    gw: Gw,
    agent: tuple[str, int],  # noqa: F811
) -> None:
    gw.pool.fake.agent = agent  # the HTTP create gives it its identity
    gw.pool.controller.warm(TEMPLATE, 1)
    gw.create("acme")  # the warm entry: a checkout
    gw.create("acme")  # the pool is empty: a cold start
    gw.pool.fake.failing_spawns = 1
    assert gw.pool.controller.warm(TEMPLATE, 1).failures
    created = gw.request(
        "POST", "/sandboxes", json={"templateID": TEMPLATE}, headers={"X-API-Key": TENANT_KEY}
    )
    assert created.status_code == 201

    m = gw.scrape()
    assert _value(m["coppice_checkouts"], "coppice_checkouts_total", template=TEMPLATE) == 1
    assert _value(m["coppice_cold_starts"], "coppice_cold_starts_total", template=TEMPLATE) == 2
    assert _value(m["coppice_warm_failures"], "coppice_warm_failures_total") == 1
    assert _value(m["coppice_checkout_seconds"], "coppice_checkout_seconds_count") == 1
    # Only the create that came through HTTP is timed as a whole request.
    assert _value(m["coppice_create_seconds"], "coppice_create_seconds_count") == 1
    assert _value(m["coppice_sandboxes"], "coppice_sandboxes", state="in_use") == 3
    assert _value(m["coppice_sandboxes"], "coppice_sandboxes", state="available") == 0
    assert _value(m["coppice_pool_size"], "coppice_pool_size", template=TEMPLATE) == 0
    assert _value(m["coppice_pool_target"], "coppice_pool_target", template=TEMPLATE) == 0
    # Pools the settings keep at size are shown even before anything of them exists.
    assert _value(m["coppice_pool_target"], "coppice_pool_target", template="base") == 2


def test_metrics_count_429s_by_reason(tmp_path: Path) -> None:
    g = _gateway(tmp_path, COPPICE_COLD_START="false")
    try:
        with pytest.raises(PoolExhausted):
            g.create()
        answer = g.request("POST", "/sandboxes", json={"templateID": TEMPLATE})
        assert answer.status_code == 429
        m = g.scrape()
        rejected = m["coppice_rejected_creates"]
        assert _value(rejected, "coppice_rejected_creates_total", reason="cold_start_off") == 2
    finally:
        g.app.gateway.keeper.stop()


def test_two_gateways_in_one_process_count_apart(tmp_path: Path) -> None:
    first, second = _gateway(tmp_path / "a"), _gateway(tmp_path / "b")
    try:
        first.create()
        assert _value(first.scrape()["coppice_cold_starts"], "coppice_cold_starts_total") == 1
        assert not second.scrape()["coppice_cold_starts"]
    finally:
        first.app.gateway.keeper.stop()
        second.app.gateway.keeper.stop()


# -- a dead sandbox, told to its owner ---------------------------------------------------------


def _envd(h: HandedOut, token: str | None = None) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": h.sandbox.id,
        "X-Access-Token": h.sandbox.access_token if token is None else token,
    }


def test_in_sandbox_traffic_finds_the_death_and_says_why(gw: Gw) -> None:
    h = gw.create("acme")
    gw.pool.fake.kill(h.sandbox.id, exit_status=-9)
    # The keeper has not looked yet: the relay finds the sandbox gone and records why.
    first = gw.request("POST", "/process.Process/List", headers=_envd(h))
    assert first.status_code == 502
    message = first.json()["message"]
    assert message.startswith(f"sandbox {h.sandbox.id} was not found: it died at ")
    assert "killed by signal 9 (SIGKILL)" in message
    assert first.json()["reason"] == "crashed"
    # Later traffic reads the tombstone; without the sandbox's token it is told nothing more.
    again = gw.request("POST", "/process.Process/List", headers=_envd(h))
    assert again.json()["message"] == message
    stranger = gw.request("GET", "/health", headers=_envd(h, token="forged"))
    assert stranger.status_code == 502
    assert stranger.json() == {"code": 502, "message": f"sandbox {h.sandbox.id} was not found"}

    got = gw.request("GET", f"/sandboxes/{h.sandbox.id}", headers={"X-API-Key": TENANT_KEY})
    assert got.status_code == 404
    body = got.json()
    assert body["message"] == message
    assert (body["state"], body["reason"]) == ("killed", "crashed")
    assert body["diedAt"].endswith("Z") and "killed by signal 9" in body["detail"]
    connect = gw.request(
        "POST", f"/v2/sandboxes/{h.sandbox.id}/connect", json={}, headers={"X-API-Key": TENANT_KEY}
    )
    assert connect.status_code == 404 and connect.json()["reason"] == "crashed"
    # Another tenant's key: a plain 404, as for any sandbox it cannot see.
    other = gw.request("GET", f"/sandboxes/{h.sandbox.id}", headers={"X-API-Key": OPS_KEY})
    assert other.json() == {"code": 404, "message": f"sandbox {h.sandbox.id} was not found"}

    deaths = gw.scrape()["coppice_sandbox_deaths"]
    assert _value(deaths, "coppice_sandbox_deaths_total", reason="crashed") == 1


def test_a_killed_sandbox_answers_as_before(gw: Gw) -> None:
    h = gw.create("acme")
    killed = gw.request("DELETE", f"/sandboxes/{h.sandbox.id}", headers={"X-API-Key": TENANT_KEY})
    assert killed.status_code == 204
    got = gw.request("GET", f"/sandboxes/{h.sandbox.id}", headers={"X-API-Key": TENANT_KEY})
    assert got.json() == {"code": 404, "message": f"sandbox {h.sandbox.id} was not found"}
    traffic = gw.request("GET", "/health", headers=_envd(h))
    assert traffic.json() == {"code": 502, "message": f"sandbox {h.sandbox.id} was not found"}


# -- a stream broken by the death of its sandbox ------------------------------------------------

FIRST_EVENT = b'{"event": {"start": {"pid": 7}}}'


def _envelope(body: bytes, flags: int = 0) -> bytes:
    return bytes([flags]) + len(body).to_bytes(4, "big") + body


class _DyingAgent(socketserver.ThreadingTCPServer):
    """Answers with one Connect envelope, then (as a killed agent's socket does) the
    connection ends without the rest; `before_drop` runs just before."""

    allow_reuse_address = True
    daemon_threads = True
    before_drop: Callable[[], None] = staticmethod(lambda: None)
    split_envelope = False


class _DyingHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        seen = b""
        while b"\r\n\r\n" not in seen:
            seen += self.request.recv(65536)
        server = self.server
        assert isinstance(server, _DyingAgent)
        body = _envelope(FIRST_EVENT)
        if server.split_envelope:
            body += _envelope(FIRST_EVENT)[:7]  # the next envelope, cut inside
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/connect+json\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n"
        )
        server.before_drop()
        self.request.shutdown(socket.SHUT_RDWR)


@pytest.fixture()
def dying_agent() -> Iterator[_DyingAgent]:
    server = _DyingAgent(("127.0.0.1", 0), _DyingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _start(gw: Gw, h: HandedOut, dying: _DyingAgent) -> httpx.Response:
    gw.pool.fake.agent = dying.server_address[:2]  # type: ignore[assignment]
    return gw.request(
        "POST",
        "/process.Process/Start",
        content=_envelope(b"{}"),
        headers={**_envd(h), "Content-Type": "application/connect+json"},
    )


def test_a_stream_cut_by_its_sandboxs_death_ends_saying_why(
    gw: Gw, dying_agent: _DyingAgent
) -> None:
    h = gw.create("acme")
    dying_agent.before_drop = lambda: gw.pool.fake.kill(h.sandbox.id, exit_status=137)
    answer = _start(gw, h, dying_agent)
    assert answer.status_code == 200
    first = _envelope(FIRST_EVENT)
    assert answer.content.startswith(first)
    end = answer.content[len(first) :]
    assert end[0] == 0x02 and int.from_bytes(end[1:5], "big") == len(end) - 5
    error = json.loads(end[5:])["error"]
    assert error["code"] == "unavailable"
    assert error["message"].startswith(f"sandbox {h.sandbox.id} was not found: it died at ")
    assert "killed by signal 9 (SIGKILL)" in error["message"]
    assert gw.pool.store.get_tombstone(h.sandbox.id) is not None


def test_a_stream_cut_inside_an_envelope_is_dropped_as_before(
    gw: Gw, dying_agent: _DyingAgent
) -> None:
    h = gw.create("acme")
    dying_agent.split_envelope = True
    dying_agent.before_drop = lambda: gw.pool.fake.kill(h.sandbox.id, exit_status=137)
    # The response is left incomplete (a server drops the connection: what a client of the
    # sandbox itself would see), which httpx's ASGI transport reports by asserting.
    with pytest.raises(AssertionError):
        _start(gw, h, dying_agent)


def test_metrics_and_pool_list_say_what_the_pool_target_follows(
    gw: Gw,
    agent: tuple[str, int],  # noqa: F811
) -> None:
    gw.pool.fake.agent = agent
    for _ in range(3):
        gw.create("acme")  # an empty pool: cold starts, and three creates within seconds
    keeper = gw.app.gateway.keeper
    keeper.refill()  # one pass of the keeper decides the targets
    m = gw.scrape()
    assert _value(m["coppice_pool_target"], "coppice_pool_target") == 3
    assert _value(m["coppice_pool_target_reason"], "coppice_pool_target_reason", reason="burst")
    assert _value(m["coppice_pool_target"], "coppice_pool_target", template="base") == 2
    assert _value(m["coppice_admission_waiting"], "coppice_admission_waiting") == 0
    recorded = gw.pool.store.pool_targets()[TEMPLATE]
    assert (recorded.target, recorded.why, recorded.wanted) == (3, "burst", 3)
