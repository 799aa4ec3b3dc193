"""Where Coppice used to differ from E2B, driven through the unmodified SDKs against
`coppice serve` with real jails (issue 8's list, one test or more per item)."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    InvalidArgumentException,
    Sandbox,
    SandboxException,
    Template,
    TimeoutException,
)
from e2b.api.client.api.sandboxes import get_v_2_sandboxes_sandbox_id_logs
from e2b.api.client.api.templates import get_templates_template_id, get_v2_templates
from e2b.api.client.models import LogLevel
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig
from e2b.sandbox.sandbox_api import SandboxQuery
from e2b_code_interpreter import Sandbox as CodeSandbox

from .gateway_process import API_KEY, GatewayProcess, wait_for

pytestmark = pytest.mark.integration

# A tiny server for a sandbox's own port: answers every GET with the request headers it got.
ECHO_SERVER = """
import http.server, json
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Echo).serve_forever()
"""


@pytest.fixture()
def sbx(gateway: GatewayProcess) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=300)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def _serve_echo(sandbox: Sandbox) -> None:
    sandbox.files.write("/tmp/echo.py", ECHO_SERVER)
    sandbox.commands.run("python3 /tmp/echo.py", background=True)
    probe = "python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000')\""
    assert wait_for(lambda: sandbox.commands.run(f"{probe} && echo up || true").stdout, 15)


def _port(gateway: GatewayProcess, sandbox_id: str, port: int, **headers: str) -> httpx.Response:
    return httpx.get(
        f"{gateway.url}/",
        headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **headers},
    )


# -- 1, 2: listing ------------------------------------------------------------------------------


def test_list_is_newest_first_and_filters_like_e2b(gateway: GatewayProcess) -> None:
    made = []
    for i in range(3):
        made.append(Sandbox.create(metadata={"suite": "order", "n": str(i)}))
        time.sleep(0.05)
    try:
        query = SandboxQuery(metadata={"suite": "order"})
        first_page = Sandbox.list(query=query, limit=2).next_items()
        assert [s.sandbox_id for s in first_page] == [made[2].sandbox_id, made[1].sandbox_id]

        after_first = Sandbox.get_info(made[1].sandbox_id).started_at
        since = Sandbox.list(
            query=SandboxQuery(metadata={"suite": "order"}, started_after=after_first)
        ).next_items()
        assert {s.sandbox_id for s in since} == {made[1].sandbox_id, made[2].sandbox_id}

        by_template = Sandbox.list(query=SandboxQuery(metadata={"suite": "order"}, template="base"))
        assert len(by_template.next_items()) == 3
        nothing = Sandbox.list(query=SandboxQuery(metadata={"suite": "order"}, template="nosuch"))
        assert nothing.next_items() == []
        future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        later = Sandbox.list(query=SandboxQuery(metadata={"suite": "order"}, started_after=future))
        assert later.next_items() == []

        h = {"X-API-Key": API_KEY}
        answer = httpx.get(
            f"{gateway.url}/v2/sandboxes", params={"metadata": "suite=order"}, headers=h
        )
        assert answer.status_code == 200 and int(answer.headers["x-total-running"]) == 3
        paused_only = httpx.get(
            f"{gateway.url}/v2/sandboxes", params={"state": "paused"}, headers=h
        )
        assert "x-total-running" not in paused_only.headers
        unknown = httpx.get(f"{gateway.url}/v2/sandboxes", params={"owner": "me"}, headers=h)
        assert unknown.status_code == 400 and "owner" in unknown.json()["message"]
    finally:
        for s in made:
            s.kill()


# -- 3, 7, 11: files ----------------------------------------------------------------------------


def test_removing_a_missing_path_is_a_no_op(sbx: Sandbox) -> None:
    sbx.files.remove("/home/user/never-was.txt")
    sbx.files.write("/home/user/x.txt", "x")
    sbx.files.remove("/home/user/x.txt")
    sbx.files.remove("/home/user/x.txt")
    assert not sbx.files.exists("/home/user/x.txt")


def test_reading_a_proc_file_returns_its_content(sbx: Sandbox) -> None:
    status = sbx.files.read("/proc/self/status")
    assert "Pid:" in status
    assert "processor" in sbx.files.read("/proc/cpuinfo")


def test_file_metadata_round_trips(sbx: Sandbox) -> None:
    info = sbx.files.write("/home/user/m.txt", "data", metadata={"Owner": "alice", "job": "42"})
    assert info.path == "/home/user/m.txt"
    assert sbx.files.get_info("/home/user/m.txt").metadata == {"owner": "alice", "job": "42"}
    sbx.files.write("/home/user/m.txt", "again")  # an upload without metadata clears it
    assert not sbx.files.get_info("/home/user/m.txt").metadata


def test_watch_events_include_the_entry(sbx: Sandbox) -> None:
    sbx.files.make_dir("/home/user/watched")
    handle = sbx.files.watch_dir("/home/user/watched", include_entry=True)
    try:
        sbx.files.write("/home/user/watched/new.txt", "hello")
        events: list[object] = []

        def arrived() -> bool:
            events.extend(handle.get_new_events())
            return bool(events)

        assert wait_for(arrived, 10)
        entries = [getattr(e, "entry", None) for e in events]
        assert any(e is not None and e.name == "new.txt" for e in entries)
    finally:
        handle.stop()


# -- 4: a stream whose sandbox dies -------------------------------------------------------------


def _kill_soon(sandbox_id: str, after_s: float = 2.0) -> threading.Thread:
    def kill() -> None:
        time.sleep(after_s)
        Sandbox.kill(sandbox_id)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


def test_a_command_streaming_when_its_sandbox_is_killed_raises(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create()
    killer = _kill_soon(sbx.sandbox_id)
    try:
        with pytest.raises(SandboxException, match="killed"):
            sbx.commands.run("echo started; sleep 60; echo never", timeout=90)
    finally:
        killer.join()


def test_run_code_when_its_sandbox_is_killed_raises_timeout(gateway: GatewayProcess) -> None:
    ci = CodeSandbox.create()
    killer = _kill_soon(ci.sandbox_id)
    try:
        with pytest.raises(TimeoutException, match="killed"):
            ci.run_code("import time\nprint('started', flush=True)\ntime.sleep(60)", timeout=90)
    finally:
        killer.join()


def test_a_download_cut_short_by_a_kill_is_not_whole(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create()
    # Sparse: 200 MB to read, none of it written (writing it under load took over a minute).
    sbx.commands.run("truncate -s 200M /tmp/big.bin")
    received = 0
    with (
        pytest.raises(httpx.TransportError),
        httpx.stream("GET", sbx.download_url("/tmp/big.bin"), timeout=60) as answer,
    ):
        assert answer.headers["content-length"] == str(200 << 20)
        for chunk in answer.iter_raw(1 << 16):
            if received == 0:
                Sandbox.kill(sbx.sandbox_id)
            received += len(chunk)
    assert received < 200 << 20


# -- 5, 6: timeouts -----------------------------------------------------------------------------


def test_a_command_timeout_raises_timeout_in_the_async_sdk(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        sbx = await AsyncSandbox.create()
        try:
            with pytest.raises(TimeoutException):
                await sbx.commands.run("sleep 30", timeout=2)
            left = await sbx.commands.run("pgrep -x sleep || true")
            assert left.stdout.strip() == ""  # the command was stopped with its deadline
        finally:
            await sbx.kill()

    asyncio.run(scenario())


def test_a_command_timeout_raises_timeout_in_the_sync_sdk(sbx: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=2)


def test_set_timeout_zero_expires_the_sandbox_now(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create()
    sbx.set_timeout(0)
    assert wait_for(lambda: not sbx.is_running(), 10)
    assert Sandbox.kill(sbx.sandbox_id) is False


# -- 8: code interpreter ------------------------------------------------------------------------


def test_a_string_result_is_the_string(gateway: GatewayProcess) -> None:
    ci = CodeSandbox.create()
    try:
        assert ci.run_code("'a'").text == "a"
        assert ci.run_code("['a', 'b']").text == "['a', 'b']"
        assert ci.run_code("42").text == "42"
    finally:
        ci.kill()


# -- 9: private ports ---------------------------------------------------------------------------


def test_private_traffic_needs_the_traffic_token(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create(network={"allow_public_traffic": False})
    try:
        token = sbx.traffic_access_token
        assert isinstance(token, str) and token
        _serve_echo(sbx)
        assert _port(gateway, sbx.sandbox_id, 8000).status_code == 403
        wrong = _port(gateway, sbx.sandbox_id, 8000, **{"e2b-traffic-access-token": "no"})
        assert wrong.status_code == 403
        right = _port(gateway, sbx.sandbox_id, 8000, **{"e2b-traffic-access-token": token})
        assert right.status_code == 200
        assert sbx.commands.run("echo envd still open").exit_code == 0
    finally:
        sbx.kill()
    public = Sandbox.create()
    try:
        assert public.traffic_access_token is None
        _serve_echo(public)
        assert _port(gateway, public.sandbox_id, 8000).status_code == 200
    finally:
        public.kill()


def test_the_code_interpreter_works_with_private_traffic(gateway: GatewayProcess) -> None:
    ci = CodeSandbox.create(network={"allow_public_traffic": False})
    try:
        assert ci.run_code("1 + 1").text == "2"
        assert ci.create_code_context().id
    finally:
        ci.kill()


# -- 10: presigned URLs behind one origin ---------------------------------------------------------


def test_signed_urls_work_behind_one_origin(sbx: Sandbox) -> None:
    sbx.files.write("/home/user/shared.txt", "signed content")
    url = sbx.download_url("/home/user/shared.txt")
    assert "E2b-Sandbox-Id" not in url and sbx.sandbox_id not in url
    assert httpx.get(url).text == "signed content"
    expiring = sbx.download_url("/home/user/shared.txt", use_signature_expiration=60)
    assert httpx.get(expiring).text == "signed content"

    upload = sbx.upload_url("/home/user/uploaded.txt")
    answer = httpx.post(upload, files={"file": ("uploaded.txt", b"sent by a browser")})
    assert answer.status_code == 200, answer.text
    assert sbx.files.read("/home/user/uploaded.txt") == "sent by a browser"

    forged = url.replace("signature=v1_", "signature=v1_AAAA")
    assert httpx.get(forged).status_code == 401
    # A read signature does not let anyone write.
    assert httpx.post(url, files={"file": ("x", b"x")}).status_code == 401


# -- 12: what Coppice cannot do yet is refused, not ignored -------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "feature"),
    [
        ({"network": {"dns_servers": ["198.51.100.53"]}}, "dnsServers"),
        ({"volume_mounts": {"/data": "vol"}}, "volume"),
    ],
)
def test_unsupported_create_fields_are_a_clear_400(
    gateway: GatewayProcess, kwargs: dict[str, object], feature: str
) -> None:
    with pytest.raises((SandboxException, InvalidArgumentException)) as info:
        Sandbox.create(**kwargs)  # type: ignore[arg-type]
    assert "400" in str(info.value) or isinstance(info.value, InvalidArgumentException)
    assert feature in str(info.value) and "not supported by Coppice yet" in str(info.value)


def test_a_filesystem_only_auto_pause_is_accepted(gateway: GatewayProcess) -> None:
    # served since snapshots landed: the files stay, the processes stop (test_jail_snapshots)
    sbx = Sandbox.create(lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
    sbx.kill()


def test_the_sdk_default_internet_flag_is_accepted(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create(allow_internet_access=True)
    assert sbx.get_info().allow_internet_access is True
    sbx.kill()


# -- 13: templates and logs -----------------------------------------------------------------------


def _api() -> object:
    return get_api_client(ConnectionConfig())


def test_templates_are_served_from_the_catalog(gateway: GatewayProcess) -> None:
    # (Aliases, e2bdev/base and friends, in test_default_images.py.)
    assert Template.exists("base") is True
    assert Template.exists("no-such-template") is False

    client = _api()
    listed = get_v2_templates.sync_detailed(client=client)  # type: ignore[arg-type]
    assert listed.status_code == 200 and listed.parsed is not None
    names = {n for t in listed.parsed for n in t.names}  # type: ignore[union-attr]
    assert "base" in names
    detail = get_templates_template_id.sync_detailed("base", client=client)  # type: ignore[arg-type]
    assert detail.status_code == 200 and detail.parsed is not None
    assert detail.parsed.template_id == "base"  # type: ignore[union-attr]
    assert [b.status.value for b in detail.parsed.builds] == ["ready"]  # type: ignore[union-attr]
    missing = get_templates_template_id.sync_detailed("nosuch", client=client)  # type: ignore[arg-type]
    assert missing.status_code == 404


def test_sandbox_logs_are_the_agent_lines(sbx: Sandbox) -> None:
    client = _api()
    answer = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(sbx.sandbox_id, client=client)  # type: ignore[arg-type]
    assert answer.status_code == 200 and answer.parsed is not None
    logs = answer.parsed.logs  # type: ignore[union-attr]
    assert logs, "a sandbox that started has log lines"
    assert all(isinstance(entry.timestamp, datetime.datetime) for entry in logs)
    assert any(
        "coppice_agent" in entry.fields.additional_properties.get("logger", "") for entry in logs
    )
    errors_only = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(
        sbx.sandbox_id,
        client=client,  # type: ignore[arg-type]
        level=LogLevel.ERROR,
    )
    assert errors_only.status_code == 200
    assert all(e.level.value == "error" for e in errors_only.parsed.logs)  # type: ignore[union-attr]
    last_ms = int(logs[-1].timestamp.timestamp() * 1000)
    after = get_v_2_sandboxes_sandbox_id_logs.sync_detailed(
        sbx.sandbox_id,
        client=client,  # type: ignore[arg-type]
        cursor=last_ms + 1,
    )
    assert after.status_code == 200 and after.parsed.logs == []  # type: ignore[union-attr]
    gone = get_v_2_sandboxes_sandbox_id_logs.sync_detailed("nosuch", client=client)  # type: ignore[arg-type]
    assert gone.status_code == 404


# -- 14 and the minor ones ------------------------------------------------------------------------


def test_python_is_python3(sbx: Sandbox) -> None:
    assert sbx.commands.run("python --version").stdout.startswith("Python 3")
    assert sbx.commands.run("python -c 'import sys; print(sys.version_info[0])'").stdout == "3\n"


def test_a_bodyless_get_is_relayed_without_a_body(gateway: GatewayProcess, sbx: Sandbox) -> None:
    _serve_echo(sbx)
    seen = _port(gateway, sbx.sandbox_id, 8000).json()
    assert "transfer-encoding" not in seen and seen.get("content-length", "0") == "0"


def test_relayed_answers_do_not_repeat_headers(gateway: GatewayProcess, sbx: Sandbox) -> None:
    sbx.files.write("/home/user/h.txt", "h")
    answer = httpx.get(
        f"{gateway.url}/files",
        params={"path": "/home/user/h.txt"},
        headers={
            "E2b-Sandbox-Id": sbx.sandbox_id,
            "X-Access-Token": sbx._envd_access_token or "",
        },
    )
    assert answer.status_code == 200
    assert len(answer.headers.get_list("date")) == 1
    assert len(answer.headers.get_list("server")) == 1
