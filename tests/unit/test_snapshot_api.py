"""Snapshots, forks and both pauses through the real gateway app (uvicorn on loopback, the
fake substrate), driven by the unmodified e2b SDK: create_snapshot, list_snapshots,
Sandbox.create(<snapshot>), delete_snapshot, fork, pause(keep_memory=False) and connect,
across a gateway restart and a simulated host reboot; bad inputs answered clearly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from e2b import Sandbox, SandboxException

from coppice.gateway.app import GatewayApp, build_gateway
from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.store.store import Store
from coppice.substrates.base import Persistence
from tests.waiting import wait_until

from .fake_pool import TEMPLATE, FakePool, fake_pool
from .test_relay_fake import agent  # noqa: F401 - the loopback agent fixture

KEY = "local"


@dataclass
class Served:
    pool: FakePool
    app: GatewayApp
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def sdk(self) -> dict[str, Any]:
        return {"api_url": self.url, "api_key": KEY, "sandbox_url": self.url}

    def http(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, self.url + path, headers={"X-API-Key": KEY}, timeout=10, **kwargs
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(pool: FakePool) -> Served:
    app = build_gateway(pool.settings, pool.controller)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout=10)
    port = server.servers[0].sockets[0].getsockname()[1]
    return Served(pool, app, server, thread, f"http://127.0.0.1:{port}")


@pytest.fixture()
def served(tmp_path: Path, agent: tuple[str, int]) -> Iterator[Served]:  # noqa: F811
    pool = fake_pool(tmp_path, COPPICE_POOL_TARGETS=f"{TEMPLATE}=0")
    pool.fake.agent = agent
    running = serve(pool)
    yield running
    running.stop()


def fake_of(served: Served, sbx: Sandbox) -> Any:
    return served.pool.fake.sandboxes[sbx.sandbox_id]


def test_snapshot_list_create_from_it_and_delete(served: Served) -> None:
    source = Sandbox.create(TEMPLATE, **served.sdk())
    fake_of(served, source).files["/home/user/notes.txt"] = "kept"
    fake_of(served, source).memory["counter"] = "7"

    info = source.create_snapshot(name="my-snap")
    assert info.snapshot_id == "default/my-snap:default"
    assert info.names == ["default/my-snap:default"]
    unnamed = source.create_snapshot()
    assert unnamed.snapshot_id.startswith("snap-") and unnamed.names == []
    assert source.get_info().state == "running"  # the source runs on

    listed = Sandbox.list_snapshots(**served.sdk()).next_items()
    assert [s.snapshot_id for s in listed] == [unnamed.snapshot_id, info.snapshot_id]
    by_source = Sandbox.list_snapshots(sandbox_id=source.sandbox_id, **served.sdk())
    assert len(by_source.next_items()) == 2
    by_name = Sandbox.list_snapshots(name="my-snap", **served.sdk()).next_items()
    assert [s.snapshot_id for s in by_name] == [info.snapshot_id]
    paged = Sandbox.list_snapshots(limit=1, **served.sdk())
    assert len(paged.next_items()) == 1 and paged.has_next
    assert len(paged.next_items()) == 1 and not paged.has_next

    for ref in (info.snapshot_id, "my-snap", unnamed.snapshot_id):
        copy = Sandbox.create(ref, **served.sdk())
        assert copy.sandbox_id != source.sandbox_id
        assert fake_of(served, copy).files == {"/home/user/notes.txt": "kept"}
        assert fake_of(served, copy).memory == {"counter": "7"}  # the fake keeps memory

    assert Sandbox.delete_snapshot(info.snapshot_id, **served.sdk()) is True
    assert Sandbox.delete_snapshot(info.snapshot_id, **served.sdk()) is False
    assert Sandbox.delete_snapshot(unnamed.snapshot_id, **served.sdk()) is True
    assert Sandbox.list_snapshots(**served.sdk()).next_items() == []
    with pytest.raises(SandboxException, match=r"snapshot .* was not found"):
        Sandbox.create(unnamed.snapshot_id, **served.sdk())


def test_snapshots_refuse_bad_input_clearly(served: Served) -> None:
    source = Sandbox.create(TEMPLATE, **served.sdk())
    path = f"/sandboxes/{source.sandbox_id}/snapshots"
    bad_name = served.http("POST", path, json={"name": "Not Valid!"})
    assert bad_name.status_code == 400 and "name must be" in bad_name.json()["message"]
    taken = served.http("POST", path, json={"name": "fake-alias"})
    assert taken.status_code == 400 and "names template" in taken.json()["message"]
    assert served.http("GET", "/snapshots?bogus=1").status_code == 400
    assert served.http("POST", "/sandboxes/nope/snapshots", json={}).status_code == 404
    source.pause()
    paused = served.http("POST", path, json={})
    assert paused.status_code == 409 and "connect()" in paused.json()["message"]


def test_a_snapshot_where_memory_cannot_be_kept_says_so(served: Served) -> None:
    served.pool.fake.persistence = Persistence(False, False)
    source = Sandbox.create(TEMPLATE, **served.sdk())
    path = f"/sandboxes/{source.sandbox_id}/snapshots"
    taken = served.http("POST", path, json={})
    assert taken.status_code == 201 and taken.json()["memory"] is False
    asked = served.http("POST", path, json={"memory": True})
    assert asked.status_code == 400 and "on the fake substrate" in asked.json()["message"]
    paused = served.http("POST", f"/sandboxes/{source.sandbox_id}/pause", json={})
    assert "a host reboot loses the memory" in paused.headers["x-coppice-pause"]
    detail = served.http("GET", f"/sandboxes/{source.sandbox_id}").json()
    assert detail["pause"] == {"memory": True, "files": True, "memorySurvivesHostReboot": False}


def test_past_the_disk_budget_the_error_names_what_to_delete(
    tmp_path: Path,
    agent: tuple[str, int],  # noqa: F811
) -> None:
    pool = fake_pool(tmp_path, COPPICE_POOL_TARGETS=f"{TEMPLATE}=0", COPPICE_SNAPSHOT_DISK_MB="1")
    pool.fake.agent = agent
    running = serve(pool)
    try:
        source = Sandbox.create(TEMPLATE, **running.sdk())
        pool.fake.sandboxes[source.sandbox_id].files["/big"] = "x" * 800_000
        first = running.http("POST", f"/sandboxes/{source.sandbox_id}/snapshots", json={})
        second = running.http("POST", f"/sandboxes/{source.sandbox_id}/snapshots", json={})
        assert second.status_code == 507
        assert first.json()["id"] in second.json()["message"]
        with pytest.raises(SandboxException, match="snapshot_disk_mb"):
            source.pause(keep_memory=False)
        assert source.get_info().state == "running"
    finally:
        running.stop()


def test_fork_gives_each_its_own_identity_and_leaves_the_source_running(served: Served) -> None:
    source = Sandbox.create(TEMPLATE, metadata={"job": "1"}, **served.sdk())
    fake_of(served, source).files["/f"] = "from the source"
    (one,) = source.fork()
    assert isinstance(one, Sandbox)
    forks = source.fork(count=5, timeout=60)
    sandboxes = [f for f in forks if isinstance(f, Sandbox)]
    assert len(sandboxes) == 5
    ids = {one.sandbox_id, source.sandbox_id, *(f.sandbox_id for f in sandboxes)}
    assert len(ids) == 7
    tokens = {f._envd_access_token for f in [one, *sandboxes]}
    assert len(tokens) == 6 and source._envd_access_token not in tokens
    ips = {fake_of(served, f).ip for f in [source, one, *sandboxes]}
    assert len(ips) == 7
    for f in sandboxes:
        assert fake_of(served, f).files == {"/f": "from the source"}
        assert f.get_info().metadata == {"job": "1"}
    assert source.get_info().state == "running"
    assert served.pool.store.list_snapshots() == []  # the fork's capture is gone

    served.pool.fake.failing_spawns = 1
    mixed = source.fork(count=2)
    assert sum(isinstance(f, Exception) for f in mixed) == 1
    assert "as asked" in str(next(f for f in mixed if isinstance(f, Exception)))


def test_fork_refuses_bad_counts_and_dead_sources(served: Served) -> None:
    source = Sandbox.create(TEMPLATE, **served.sdk())
    path = f"/sandboxes/{source.sandbox_id}/fork"
    for count in (0, 101, "3", True):
        answer = served.http("POST", path, json={"count": count})
        assert answer.status_code == 400 and "between 1 and 100" in answer.json()["message"]
    served.pool.fake.kill(source.sandbox_id, exit_status=137)
    served.app.gateway.keeper.watch()
    dead = served.http("POST", path, json={"count": 1})
    assert dead.status_code == 404 and "died" in dead.json()["message"]


def test_pause_both_ways_then_restart_reboot_and_connect(
    served: Served,
    agent: tuple[str, int],  # noqa: F811
) -> None:
    served.pool.fake.persistence = Persistence(False, False)  # a freeze is lost on reboot
    files_only = Sandbox.create(TEMPLATE, **served.sdk())
    frozen = Sandbox.create(TEMPLATE, **served.sdk())
    for sbx in (files_only, frozen):
        fake_of(served, sbx).files["/home/user/work"] = sbx.sandbox_id
    assert files_only.pause(keep_memory=False) is True
    assert frozen.pause() is True
    assert files_only.get_info().state == "paused"
    detail = served.http("GET", f"/sandboxes/{files_only.sandbox_id}").json()
    assert detail["pause"]["memory"] is False
    assert not fake_of(served, files_only).alive

    # the gateway stops, the host reboots, a new gateway reconciles on the same database
    served.stop()
    pool = served.pool
    pool.fake.reboot()
    controller = PoolController(pool.settings, Store(pool.store.path), {"fake": pool.fake})
    report = controller.reconcile()
    assert report.kept_paused == [frozen.sandbox_id]
    again = serve(FakePool(pool.settings, pool.fake, controller))
    try:
        for sbx in (files_only, frozen):
            back = Sandbox.connect(sbx.sandbox_id, **again.sdk())
            assert back.sandbox_id == sbx.sandbox_id
            state = controller.store.get(sbx.sandbox_id).state
            assert state is State.IN_USE
            assert pool.fake.sandboxes[sbx.sandbox_id].files == {"/home/user/work": sbx.sandbox_id}
            assert pool.fake.sandboxes[sbx.sandbox_id].boots == 2
    finally:
        again.stop()


def test_traffic_never_boots_a_files_only_pause(served: Served) -> None:
    lifecycle: Any = {"on_timeout": "pause", "auto_resume": True}
    sbx = Sandbox.create(TEMPLATE, lifecycle=lifecycle, **served.sdk())
    sbx.pause(keep_memory=False)
    answer = httpx.get(
        served.url + "/health",
        headers={
            "E2b-Sandbox-Id": sbx.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sbx._envd_access_token or "",
        },
    )
    assert answer.status_code == 502 and "paused" in answer.json()["message"]
    assert served.pool.store.get(sbx.sandbox_id).state is State.PAUSED_FILES
