"""The gateway app (control plane and relay) over the fake substrate, whose sandboxes' agent
is a small HTTP server on loopback: routing, tokens, private ports, presigned URLs."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from e2b.sandbox.signature import get_signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from coppice.gateway.app import GatewayApp, build_gateway
from coppice.gateway.auth import DEFAULT_TENANT
from coppice.gateway.wire import CreateRequest
from coppice.store.records import HandedOut

from .fake_pool import TEMPLATE, FakePool, fake_pool, tenant


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "path": request.url.path,
            "query": request.url.query,
            "token": request.headers.get("x-access-token"),
            "routing": [k for k in request.headers if k.startswith("e2b-sandbox-")],
        }
    )


@pytest.fixture(scope="module")
def agent() -> Iterator[tuple[str, int]]:
    """Stands in for every fake sandbox's agent."""
    app = Starlette(routes=[Route("/{path:path}", _echo, methods=["GET", "POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(timeout=10)


class Gw:
    def __init__(self, pool: FakePool, app: GatewayApp) -> None:
        self.pool = pool
        self.app = app

    def create(self, public: bool = True) -> HandedOut:
        req = CreateRequest(TEMPLATE, 300, {}, {}, "kill", False, public_traffic=public)
        # The tenant every key maps to while no keys are configured.
        handed, _ = self.app.gateway.service.create(req, tenant(DEFAULT_TENANT), None)
        return handed

    def request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        async def go() -> httpx.Response:
            # As a server would: an app's exception is its 500 answer, not the client's.
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                try:
                    return await client.request(method, url, **kwargs)  # type: ignore[arg-type]
                finally:
                    await self.app.gateway.proxy.aclose()

        return asyncio.run(go())


@pytest.fixture()
def gw(tmp_path: Path, agent: tuple[str, int]) -> Iterator[Gw]:
    pool = fake_pool(tmp_path)
    pool.fake.agent = agent
    app = build_gateway(pool.settings, pool.controller)
    pool.controller.warm(TEMPLATE, 2)
    yield Gw(pool, app)
    app.gateway.keeper.stop()


def _to(h: HandedOut, port: int = 49983, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": h.sandbox.id,
        "E2b-Sandbox-Port": str(port),
        "X-Access-Token": h.sandbox.access_token,
        **(extra or {}),
    }


def test_in_sandbox_traffic_reaches_the_drivers_agent_address(gw: Gw) -> None:
    h = gw.create()
    answer = gw.request("GET", "/process.Process/List", headers=_to(h))
    assert answer.status_code == 200
    body = answer.json()
    assert body["path"] == "/process.Process/List" and body["token"] == h.sandbox.access_token
    assert body["routing"] == []  # the gateway's routing headers stay with the gateway


def test_a_wrong_token_and_an_unknown_sandbox(gw: Gw) -> None:
    h = gw.create()
    forged = gw.request("GET", "/health", headers=_to(h, extra={"X-Access-Token": "forged"}))
    assert forged.status_code == 401
    gone = gw.request("GET", "/health", headers={"E2b-Sandbox-Id": "nosuch"})
    assert gone.status_code == 502 and "sandbox nosuch was not found" in gone.json()["message"]


def test_private_ports_need_the_traffic_token(gw: Gw) -> None:
    h = gw.create(public=False)
    assert h.sandbox.traffic_token
    refused = gw.request("GET", "/", headers=_to(h, port=8000))
    assert refused.status_code == 403 and "e2b-traffic-access-token" in refused.json()["message"]
    let_through = gw.request(
        "GET",
        "/",
        headers=_to(
            h, port=8000, extra={"e2b-traffic-access-token": h.sandbox.traffic_token or ""}
        ),
    )
    # Past the token check; nothing listens on the fake's port 8000.
    assert let_through.status_code == 502 and "port 8000" in let_through.json()["message"]
    # envd's own port is guarded by the access token alone.
    assert gw.request("GET", "/health", headers=_to(h)).status_code == 200


def test_a_presigned_url_needs_no_routing_headers(gw: Gw) -> None:
    gw.create()
    h = gw.create()
    signed = get_signature("/home/user/a.txt", "read", None, h.sandbox.access_token)
    answer = gw.request(
        "GET", "/files", params={"path": "/home/user/a.txt", "signature": signed["signature"]}
    )
    assert answer.status_code == 200 and answer.json()["path"] == "/files"
    bogus = gw.request("GET", "/files", params={"path": "/x", "signature": "v1_bogus"})
    assert bogus.status_code == 401 and "matches no sandbox" in bogus.json()["message"]


def test_control_plane_lists_newest_first_with_total_running(gw: Gw) -> None:
    first = gw.create()
    time.sleep(0.01)
    second = gw.create()
    answer = gw.request("GET", "/v2/sandboxes", headers={"X-API-Key": "any"})
    assert answer.status_code == 200 and answer.headers["x-total-running"] == "2"
    assert [s["sandboxID"] for s in answer.json()] == [second.sandbox.id, first.sandbox.id]
    assert (
        gw.request("GET", "/v2/sandboxes?owner=me", headers={"X-API-Key": "k"}).status_code == 400
    )


def test_a_500_carries_none_of_the_exceptions_text(gw: Gw, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("secret detail of the gateway")

    monkeypatch.setattr(gw.app.gateway.service, "get", broken)
    answer = gw.request("GET", "/sandboxes/whatever", headers={"X-API-Key": "k"})
    assert answer.status_code == 500
    assert "secret" not in answer.text and "log" in answer.json()["message"]


def test_a_paused_sandbox_without_auto_resume_says_so(gw: Gw) -> None:
    h = gw.create()
    gw.app.gateway.service.pause(tenant(DEFAULT_TENANT), h.sandbox.id)
    answer = gw.request("GET", "/health", headers=_to(h))
    assert answer.status_code == 502 and "is paused" in answer.json()["message"]
