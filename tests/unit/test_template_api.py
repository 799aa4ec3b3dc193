"""E2B's template build API on the real gateway app (uvicorn on loopback, the fake
substrate), driven by the unmodified e2b SDK's `Template`: file uploads, logs, a failing
step, background builds, tags, delete, and the restart rule. The builder is a stand-in that
writes a template record and logs as the real one does."""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from e2b import BuildException, Template, TemplateException, wait_for_port
from e2b.api.client.api.templates import (
    delete_templates_template_id,
    get_templates,
    get_templates_template_id,
)
from e2b.api.client.models import TemplateWithBuilds
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig
from e2b.template.logger import LogEntry

from coppice.config import Limits
from coppice.errors import NotSupportedYet, TemplateBuildError
from coppice.gateway.app import GatewayApp, build_gateway
from coppice.gateway.template_builds import RESTARTED, BuildService
from coppice.host.processes import ProcessIdentity
from coppice.images.build_files import BuildFiles, UploadedFiles
from coppice.images.spec import FromImage, TemplateSpec
from coppice.lifecycle import State
from coppice.progress import Progress
from coppice.store.records import TemplatePolicy, TemplateRecord
from coppice.store.store import Store
from tests.waiting import wait_until

from .fake_pool import TEMPLATE, FakePool, fake_pool, sandbox_record

KEY = "local"


@dataclass
class FakeBuilder:
    """Builds as `TemplateBuilder.build_spec` does, minus the image: numbered steps in the
    log, COPY files read from the uploads, `exit 3` fails its step, `hold` waits."""

    store: Store
    release: threading.Event = field(default_factory=threading.Event)
    specs: list[TemplateSpec] = field(default_factory=list)

    def __call__(self, spec: TemplateSpec, files: BuildFiles, progress: Progress) -> TemplateRecord:
        self.specs.append(spec)
        progress.log("pulling the base image", step="base")
        total = len(spec.steps)
        for number, step in enumerate(spec.steps, start=1):
            title = f"[{number}/{total}] {step.label()}"
            progress.stage(title)
            progress.log(title, step=str(number))
            if step.kind == "COPY":
                # The archive as uploaded (unpacking it is the real builder's business).
                assert isinstance(files, UploadedFiles) and step.files_hash is not None
                with tarfile.open(files.archive_path(step.files_hash), "r:*") as tar:
                    names = sorted(Path(n).name for n in tar.getnames())
                progress.log(f"copied {', '.join(names)}", step=str(number))
            if step.kind == "RUN" and "exit 3" in step.args[0]:
                progress.log("about to fail", step=str(number))
                raise TemplateBuildError(
                    "the command exited with exit status 3",
                    step=str(number),
                    log_tail=("about to fail",),
                )
            if step.kind == "RUN" and step.args[0] == "hold":
                assert self.release.wait(5)
        record = TemplateRecord(
            name=spec.name,
            substrate="fake",
            recipe_hash=hashlib.sha256(repr((spec.base, spec.steps)).encode()).hexdigest(),
            rootfs="/nonexistent",
            built_at=time.time(),
            build_seconds=0.01,
            size_bytes=0,
            policy=TemplatePolicy(spec.limits, spec.aliases, spec.cold_start),
        )
        self.store.put_template(record)
        return record


@dataclass
class Served:
    pool: FakePool
    app: GatewayApp
    builder: FakeBuilder
    url: str

    def sdk(self) -> dict[str, Any]:
        return {"api_url": self.url, "api_key": KEY}

    def http(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"X-API-Key": KEY, **kwargs.pop("headers", {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kwargs)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pool = fake_pool(tmp_path_factory.mktemp("gw"), COPPICE_POOL_TARGETS=f"{TEMPLATE}=0")
    builder = FakeBuilder(pool.store)
    app = build_gateway(pool.settings, pool.controller, build=builder)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started, timeout=10)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(pool, app, builder, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def context(tmp_path: Path) -> Path:
    (tmp_path / "somefile").write_text("some content\n")
    return tmp_path


def _client(served: Served) -> Any:
    return get_api_client(ConnectionConfig(**served.sdk()))


def test_a_build_uploads_its_files_streams_its_log_and_serves(
    served: Served, context: Path
) -> None:
    template = (
        Template(file_context_path=str(context))
        .from_image("debian:bookworm")
        .copy("somefile", "/app/")
        .run_cmd("echo hi")
        .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    )
    logs: list[LogEntry] = []
    info = Template.build(template, "api-copy", cpu_count=2, memory_mb=1024,
                          on_build_logs=logs.append, **served.sdk())  # fmt: skip
    messages = [e.message for e in logs]
    assert info.template_id == "api-copy" and info.tags == ["default"]
    assert "[1/2] COPY somefile /app/" in messages and "copied somefile" in messages
    assert messages.count("[2/2] RUN echo hi") == 1  # the stage and its log line are one
    assert any(m.startswith("Uploaded 'somefile'") for m in messages)
    spec = served.builder.specs[-1]
    assert spec.start_cmd == "python3 -m http.server 8000" and spec.ready_cmd
    assert spec.limits == Limits(memory_mb=1024, pids=256, cpus=2.0, disk_mb=1024)
    assert Template.exists("api-copy", **served.sdk())

    answer = get_templates.sync(client=_client(served))
    assert isinstance(answer, list)
    listed = {t.template_id: t for t in answer}
    assert (listed["api-copy"].cpu_count, listed["api-copy"].memory_mb) == (2, 1024)
    assert listed["api-copy"].disk_size_mb == 1024
    assert listed["api-copy"].build_status.value == "ready"
    assert listed["api-copy"].build_id == info.build_id

    # The same files again: already uploaded, so the SDK skips them.
    again: list[LogEntry] = []
    Template.build(template, "api-copy", on_build_logs=again.append, **served.sdk())
    assert any("already cached" in e.message for e in again)
    detail = get_templates_template_id.sync("api-copy", client=_client(served))
    assert isinstance(detail, TemplateWithBuilds) and detail.build_count == 2
    assert [b.status.value for b in detail.builds] == ["ready", "ready"]


def test_a_failing_step_raises_with_its_step_and_log_and_keeps_the_old_version(
    served: Served,
) -> None:
    Template.build(Template().from_image("debian:bookworm").run_cmd("echo v1"), "api-fail",
                   **served.sdk())  # fmt: skip
    before = served.pool.store.get_template("api-fail")
    broken = Template().from_image("debian:bookworm").run_cmd("echo v2").run_cmd("exit 3")
    logs: list[LogEntry] = []
    with pytest.raises(BuildException) as info:
        Template.build(broken, "api-fail", on_build_logs=logs.append, **served.sdk())
    text = str(info.value)
    assert "step 2 (RUN exit 3)" in text and "exit status 3" in text and "about to fail" in text
    assert any(e.level == "error" and "build failed" in e.message for e in logs)
    assert served.pool.store.get_template("api-fail") == before
    detail = get_templates_template_id.sync("api-fail", client=_client(served))
    assert isinstance(detail, TemplateWithBuilds) and detail.build_status.value == "error"
    assert [b.status.value for b in detail.builds] == ["error", "ready"]
    assert detail.build_id == served.app.gateway.service.catalog.current_build(before).id


def test_a_background_build_reports_its_status(served: Served) -> None:
    served.builder.release.clear()
    template = Template().from_image("debian:bookworm").run_cmd("hold")
    info = Template.build_in_background(template, "api-background", **served.sdk())
    assert wait_until(
        lambda: Template.get_build_status(info, **served.sdk()).status.value == "building"
    )
    assert not Template.exists("api-background", **served.sdk())
    served.builder.release.set()
    assert wait_until(
        lambda: Template.get_build_status(info, **served.sdk()).status.value == "ready"
    )
    status = Template.get_build_status(info, logs_offset=1, **served.sdk())
    assert status.log_entries[0].message == "[1/1] RUN hold" and status.reason is None
    assert Template.exists("api-background", **served.sdk())

    logs = served.http("GET", f"/templates/api-background/builds/{info.build_id}/logs",
                       params={"direction": "backward", "limit": "1"})  # fmt: skip
    assert logs.status_code == 200 and len(logs.json()["logs"]) == 1
    bad = served.http("GET", f"/templates/api-background/builds/{info.build_id}/logs",
                      params={"since": "1"})  # fmt: skip
    assert bad.status_code == 400


def test_tags_name_builds_and_only_the_latest_one_serves(served: Served) -> None:
    first = Template.build(Template().from_image("debian:bookworm").run_cmd("echo 1"),
                           "api-tags:v1", **served.sdk())  # fmt: skip
    assert first.tags == ["v1"]
    assigned = Template.assign_tags("api-tags:v1", ["prod"], **served.sdk())
    assert assigned.build_id == first.build_id and assigned.tags == ["prod"]
    second = Template.build(Template().from_image("debian:bookworm").run_cmd("echo 2"),
                            "api-tags", tags=["v2"], **served.sdk())  # fmt: skip
    tags = {t.tag: t.build_id for t in Template.get_tags("api-tags", **served.sdk())}
    assert tags == {"v1": first.build_id, "prod": first.build_id, "v2": second.build_id}

    catalog = served.app.gateway.service.catalog
    assert catalog.resolve("api-tags:v2").name == "api-tags"
    assert catalog.resolve("api-tags:default").name == "api-tags"  # never tagged: the latest
    old = served.http("POST", "/v2/sandboxes", json={"templateID": "api-tags:v1"})
    assert old.status_code == 400
    assert "latest build" in old.json()["message"] and "'api-tags:v2'" in old.json()["message"]
    with pytest.raises(NotSupportedYet):
        catalog.resolve("api-tags:prod")
    missing = served.http("POST", "/v2/sandboxes", json={"templateID": "api-tags:nope"})
    assert missing.status_code == 404 and "no tag 'nope'" in missing.json()["message"]

    Template.remove_tags("api-tags", "prod", **served.sdk())
    assert "prod" not in {t.tag for t in Template.get_tags("api-tags", **served.sdk())}
    with pytest.raises(TemplateException):
        Template.remove_tags("api-tags", ["v1", "prod"], **served.sdk())
    assert "v1" in {t.tag for t in Template.get_tags("api-tags", **served.sdk())}


def test_tags_on_a_template_built_without_the_api(served: Served) -> None:
    assigned = Template.assign_tags(TEMPLATE, "stable", **served.sdk())
    current = served.app.gateway.service.catalog.current_build(
        served.pool.store.get_template(TEMPLATE)
    )
    assert assigned.build_id == current.id
    assert served.app.gateway.service.catalog.resolve(f"{TEMPLATE}:stable").name == TEMPLATE


def test_delete_refuses_while_in_use_then_drains_and_removes(served: Served) -> None:
    Template.build(Template().from_image("debian:bookworm"), "api-del", **served.sdk())
    controller = served.pool.controller
    controller.warm("api-del", 2)
    in_use = controller.checkout("api-del", sandbox_record(template_id="api-del"))
    client = _client(served)
    refused = delete_templates_template_id.sync_detailed("api-del", client=client)
    assert refused.status_code == 409 and b"in use" in refused.content
    controller.return_entry(in_use.id)
    assert wait_until(lambda: all(e.state is State.AVAILABLE
                                  for e in controller.list("api-del")))  # fmt: skip
    assert delete_templates_template_id.sync_detailed("api-del", client=client).status_code == 204
    assert controller.list("api-del") == []
    assert not Template.exists("api-del", **served.sdk())
    assert served.pool.store.list_builds("api-del") == []
    assert served.http("GET", "/templates/api-del").status_code == 404
    kept_warm = delete_templates_template_id.sync_detailed(TEMPLATE, client=client)
    assert kept_warm.status_code == 409 and b"pool_targets" in kept_warm.content


def test_uploads_need_the_urls_signature(served: Served) -> None:
    requested = served.http("POST", "/v3/templates", json={"name": "api-upload"})
    assert requested.status_code == 202
    link = served.http("GET", "/templates/api-upload/files/abcdef0123456789")
    assert link.status_code == 201 and link.json()["present"] is False
    url = link.json()["url"]
    assert url.startswith(served.url + "/templates/api-upload/files/abcdef0123456789?")
    forged = url.replace("signature=", "signature=0")
    assert httpx.put(forged, content=b"tar").status_code == 403
    unsigned = url.split("?")[0]
    assert httpx.put(unsigned, content=b"tar").status_code == 403
    assert httpx.put(url, content=b"tar").status_code == 201
    again = served.http("GET", "/templates/api-upload/files/abcdef0123456789")
    assert again.json()["present"] is True
    other = url.replace("/api-upload/", "/api-other/")
    assert httpx.put(other, content=b"tar").status_code == 403


def test_build_requests_are_checked(served: Served) -> None:
    def post(body: dict[str, Any]) -> httpx.Response:
        return served.http("POST", "/v3/templates", json=body)

    assert "not valid" in post({"name": "Bad Name"}).json()["message"]
    assert "unknown field(s) bogus" in post({"name": "ok", "bogus": 1}).json()["message"]
    assert post({"name": "ok", "cpuCount": 0}).status_code == 400
    assert post({"name": "ok", "memoryMB": 64}).status_code == 400
    assert "another name of template" in post({"name": "fake-alias"}).json()["message"]
    made = post({"name": "api-checks:v1", "tags": ["x"], "minFreeDiskMb": 4096})
    assert made.status_code == 202 and made.json()["tags"] == ["v1", "x"]
    build_id = made.json()["buildID"]
    assert served.pool.store.get_build(build_id).limits.disk_mb == 4096  # type: ignore[union-attr]
    start = f"/v2/templates/api-checks/builds/{build_id}"
    bad_step = served.http("POST", start, json={"fromImage": "x", "later": True})
    assert bad_step.status_code == 400 and "later" in bad_step.json()["message"]
    host_path = served.http("POST", start, json={"fromImage": "oci-archive:/etc/shadow"})
    assert host_path.status_code == 403 and "path on the Coppice host" in host_path.text
    assert served.http("POST", start, json={"fromImage": "debian:bookworm"}).status_code == 202
    assert served.http("POST", start, json={"fromImage": "debian:bookworm"}).status_code == 409
    assert served.http("POST", "/v2/templates/api-checks/builds/nope", json={}).status_code == 404
    status = served.http("GET", f"/templates/api-checks/builds/{build_id}/status",
                         params={"level": "loud"})  # fmt: skip
    assert status.status_code == 400


def test_a_restart_ends_builds_that_were_running(tmp_path: Path) -> None:
    # Written by a process that is gone (this pid, another start time).
    store = Store(tmp_path / "db", owner=ProcessIdentity(os.getpid(), 0))
    running = store.add_build("t", Limits(), ["default"])
    store.trigger_build(running.id)
    store.begin_build(running.id)
    queued = store.add_build("t", Limits(), ["default"])
    store.trigger_build(queued.id)
    asked = store.add_build("t", Limits(), ["default"])

    def never(spec: TemplateSpec, files: BuildFiles, progress: Progress) -> TemplateRecord:
        raise AssertionError("nothing is built")

    service = BuildService(store, tmp_path, never)
    service.start()
    service.stop()
    for build_id in (running.id, queued.id):
        build = store.get_build(build_id)
        assert build is not None and build.status == "error"
        assert build.failure is not None and build.failure.message == RESTARTED
    left = store.get_build(asked.id)
    assert left is not None and left.status == "waiting" and not left.triggered


def test_a_rebuilt_template_replaces_its_available_entries(served: Served) -> None:
    controller = served.pool.controller
    keeper = served.app.gateway.keeper
    old = {e.id for e in controller.warm(TEMPLATE, 2).started}
    replaced = keeper.template_changed(TEMPLATE)
    assert set(replaced) == old
    assert wait_until(lambda: not old & {e.id for e in controller.list(TEMPLATE)})


def test_builds_of_one_template_wait_for_each_other(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    gates = {name: threading.Event() for name in ("a1", "a2", "b1")}
    started: list[str] = []
    built: list[TemplateRecord] = []

    def build(spec: TemplateSpec, files: BuildFiles, progress: Progress) -> TemplateRecord:
        started.append(spec.description)
        assert gates[spec.description].wait(5)
        return TemplateRecord(spec.name, "fake", spec.description, "/r", 0.0, 0.0, 0)

    service = BuildService(store, tmp_path, build, built.append, parallelism=2)
    service.start()
    for label in gates:
        build_id = store.add_build(label[0], Limits(), ["default"]).id
        store.trigger_build(build_id)
        service.submit(build_id, TemplateSpec(label[0], FromImage("x"), description=label))
    try:
        # Two workers: the second takes b's build, not a's second one.
        assert wait_until(lambda: sorted(started) == ["a1", "b1"])
        assert service.busy("a") and service.busy("b")
        gates["a1"].set()
        assert wait_until(lambda: started[-1] == "a2")
    finally:
        for gate in gates.values():
            gate.set()
        assert wait_until(lambda: len(built) == 3)
        service.stop()
    assert [b.status for b in store.list_builds()] == ["ready"] * 3
