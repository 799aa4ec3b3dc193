"""The code-interpreter server against a real ipykernel, driven over loopback HTTP by httpx
and by the unmodified e2b-code-interpreter SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from e2b import ConnectionConfig, NotFoundException
from e2b_code_interpreter import Sandbox
from packaging.version import Version

from coppice_agent.environment import SandboxEnvironment
from coppice_agent.interpreter import Interpreter, build_interpreter_app
from tests.agent.envd_harness import sandbox_env
from tests.waiting import wait_until

T = TypeVar("T")


@dataclass
class Served:
    url: str
    env: SandboxEnvironment
    interpreter: Interpreter
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's event loop (the interpreter lives there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def sdk(self) -> Any:
        # The SDK's own constructor, minus the control plane: every call goes to sandbox_url.
        return Sandbox(
            sandbox_id="test",
            sandbox_domain=None,
            envd_version=Version("0.6.4"),
            envd_access_token=None,
            traffic_access_token=None,
            connection_config=ConnectionConfig(sandbox_url=self.url, api_key="e2b_test"),
        )


def _kernel_children() -> set[int]:
    """Kernel processes started by this test process that are still around."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == os.getpid() and b"ipykernel" in cmdline:
            found.add(int(entry.name))
    return found


@contextmanager
def serve(env: SandboxEnvironment) -> Iterator[Served]:
    # Another server's kernels (the module fixture's) may be running meanwhile.
    others = _kernel_children()
    interpreter = Interpreter(env)
    app = build_interpreter_app(interpreter, env)
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets that say they are
    # TCP, and without it every keep-alive request stalls ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []

    async def main() -> None:
        try:
            await interpreter.start()
            await server.serve(sockets=[sock])
        except BaseException as exc:
            failure.append(exc)
        finally:
            await interpreter.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and not failure and time.monotonic() < deadline:
        time.sleep(0.01)
    if failure:
        raise failure[0]
    assert server.started, "interpreter server did not start"
    try:
        yield Served(f"http://127.0.0.1:{port}", env, interpreter, loop)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        loop.close()
        sock.close()
        assert _kernel_children() - others == set(), "kernel processes left behind"


@pytest.fixture(scope="module")
def served(home: Path) -> Iterator[Served]:
    with serve(sandbox_env(home)) as s:
        yield s


@pytest.fixture(scope="module")
def sbx(served: Served) -> Any:
    return served.sdk()


def execute(served: Served, code: str, **fields: Any) -> list[dict[str, Any]]:
    body = {"code": code, "context_id": None, "language": None, "env_vars": None, **fields}
    with httpx.Client(timeout=30) as client:
        response = client.post(f"{served.url}/execute", json=body)
    assert response.status_code == 200, response.text
    lines = response.text.split("\n")
    assert lines[-1] == "", "body must end with a newline"
    assert all(line.strip() for line in lines[:-1]), "no blank lines, ever"
    return [json.loads(line) for line in lines[:-1]]


def until_exists(path: Path) -> str:
    """Kernel code that waits until `path` exists (30 s at most), then sets `found`."""
    return (
        "import pathlib, time\n"
        "_deadline = time.monotonic() + 30\n"
        f"while not pathlib.Path({str(path)!r}).exists() and time.monotonic() < _deadline:\n"
        "    time.sleep(0.01)\n"
        f"found = pathlib.Path({str(path)!r}).exists()\n"
    )


def body_for(code: str, context_id: str | None = None) -> dict[str, Any]:
    return {"code": code, "context_id": context_id, "language": None, "env_vars": None}


def tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


# -- the SDK's view ---------------------------------------------------------------------------


def test_sdk_core_flow(served: Served, sbx: Any) -> None:
    assert served.interpreter.is_ready
    ex = sbx.run_code("x = 1\nprint('hi')\nx + 1")
    assert ex.error is None
    assert ex.text == "2"
    assert ex.logs.stdout == ["hi\n"]
    assert ex.logs.stderr == []
    assert isinstance(ex.execution_count, int)

    ex = sbx.run_code("1/0")
    assert ex.error is not None
    assert ex.error.name == "ZeroDivisionError"
    assert ex.error.value == "division by zero"
    assert "ZeroDivisionError" in ex.error.traceback
    assert ex.text is None

    ex = sbx.run_code("x * 10")
    assert ex.text == "10"


def test_sdk_contexts(served: Served, sbx: Any, tmp_path: Path) -> None:
    ctx = sbx.create_code_context(cwd=str(tmp_path))
    assert ctx.cwd == str(tmp_path)
    assert ctx.language == "python"
    assert sbx.run_code("y = 5\ny * 2", context=ctx).text == "10"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == str(tmp_path)
    # Contexts do not share state.
    assert sbx.run_code("'y' in dir()").text == "False"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]

    sbx.restart_code_context(ctx)
    ex = sbx.run_code("y", context=ctx)
    assert ex.error is not None
    assert ex.error.name == "NameError"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == str(tmp_path)

    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)


def test_sdk_str_results_are_the_string_itself(sbx: Any) -> None:
    # E2B's server strips the repr of a plain str value, and only of that.
    assert sbx.run_code("'a'").text == "a"
    assert sbx.run_code("''").text == ""
    assert sbx.run_code("'line one\\nline \"two\"'").text == 'line one\nline "two"'
    assert sbx.run_code("['a', 'b']").text == "['a', 'b']"
    assert sbx.run_code("{'k': 'v'}").text == "{'k': 'v'}"
    assert sbx.run_code("b'a'").text == "b'a'"
    assert sbx.run_code("class S(str):\n    pass\nS('sub')").text == "'sub'"
    quoted_repr = "class Q:\n    def __repr__(self):\n        return \"'q'\"\nQ()"
    assert sbx.run_code(quoted_repr).text == "'q'"
    # Only the cell's value: a displayed string keeps its repr.
    ex = sbx.run_code("from IPython.display import display\ndisplay('shown')\n'main'")
    shown, main = ex.results
    assert (shown.is_main_result, shown.text) == (False, "'shown'")
    assert (main.is_main_result, main.text) == (True, "main")
    assert "application/x-coppice-str" not in (shown.extra or {})


def test_sdk_streaming_callbacks_and_envs(sbx: Any) -> None:
    seen: list[str] = []
    ex = sbx.run_code(
        "import os, sys\nprint('out')\nprint('err', file=sys.stderr)\nos.environ.get('FOO')",
        envs={"FOO": "bar"},
        on_stdout=lambda m: seen.append(m.line),
    )
    assert seen == ["out\n"]
    assert ex.logs.stderr == ["err\n"]
    assert ex.text == "bar"


# -- the wire format --------------------------------------------------------------------------


def test_wire_format(served: Served) -> None:
    before = time.time_ns()
    events = execute(served, "print('a')\n21 * 2")
    after = time.time_ns()
    assert [e["type"] for e in events] == [
        "number_of_executions",
        "stdout",
        "result",
        "end_of_execution",
    ]
    assert isinstance(events[0]["execution_count"], int)
    stdout = events[1]
    assert stdout["text"] == "a\n"
    assert isinstance(stdout["timestamp"], int)
    assert before <= stdout["timestamp"] <= after
    assert events[2] == {"type": "result", "text": "42", "is_main_result": True}


def test_error_is_not_an_http_error(served: Served) -> None:
    events = execute(served, "raise ValueError('nope')")
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["name"] == "ValueError"
    assert errors[0]["value"] == "nope"
    assert isinstance(errors[0]["traceback"], str)
    assert events[-1] == {"type": "end_of_execution"}


def test_display_png_and_main_png(served: Served) -> None:
    png = tiny_png()
    code = (
        "from IPython.display import Image, display\n"
        f"display(Image(data={png!r}, format='png'))\n"
        "class Pic:\n"
        f"    def _repr_png_(self): return {png!r}\n"
        "Pic()"
    )
    results = [e for e in execute(served, code) if e["type"] == "result"]
    assert len(results) == 2
    shown, main = results
    assert shown["is_main_result"] is False
    assert base64.b64decode(shown["png"]) == png
    assert main["is_main_result"] is True
    assert base64.b64decode(main["png"]) == png
    assert "Pic at 0x" in main["text"]


def test_html_markdown_json_and_extra(served: Served) -> None:
    code = (
        "from IPython.display import HTML, Markdown, JSON, display\n"
        "display(Markdown('# hi'))\n"
        "display({'application/x-custom': 'raw', 'text/plain': 'c'}, raw=True)\n"
        "display(JSON({'a': 1}))\n"
        "HTML('<b>bold</b>')"
    )
    results = [e for e in execute(served, code) if e["type"] == "result"]
    assert results[0]["markdown"] == "# hi"
    assert results[1]["extra"] == {"application/x-custom": "raw"}
    assert results[1]["text"] == "c"
    assert results[2]["json"] == {"a": 1}
    assert results[3]["html"] == "<b>bold</b>"
    assert results[3]["is_main_result"] is True


def test_env_vars_apply_to_one_execution(served: Served) -> None:
    execute(served, "import os\nos.environ['KEEP'] = 'mine'\nos.environ.pop('ONCE', None)")
    events = execute(
        served,
        "os.environ['KEEP'], os.environ['ONCE']",
        env_vars={"KEEP": "theirs", "ONCE": "1"},
    )
    assert events[-2]["text"] == "('theirs', '1')"
    events = execute(served, "os.environ['KEEP'], os.environ.get('ONCE')")
    assert events[-2]["text"] == "('mine', None)"


def test_env_init_reaches_live_and_new_kernels(served: Served, tmp_path: Path) -> None:
    before = execute(served, "import os; repr(os.environ.get('SANDBOX_WIDE'))")
    assert before[-2]["text"] == "None"
    served.call(served.env.init(env_vars={"SANDBOX_WIDE": "yes"}))
    after = execute(served, "import os; repr(os.environ.get('SANDBOX_WIDE'))")
    assert after[-2]["text"] == "'yes'"
    with httpx.Client(timeout=60) as client:
        ctx = client.post(f"{served.url}/contexts", json={"cwd": str(tmp_path)}).json()
    fresh = execute(served, "import os; os.environ['SANDBOX_WIDE']", context_id=ctx["id"])
    assert fresh[-2]["text"] == "yes"
    # A second init replaces the sandbox-wide set rather than adding to it.
    served.call(served.env.init(env_vars={"OTHER": "1"}))
    again = execute(served, "os.environ.get('SANDBOX_WIDE'), os.environ.get('OTHER')")
    assert again[-2]["text"] == "(None, '1')"


def test_streams_output_as_it_is_produced(served: Served, tmp_path: Path) -> None:
    # The cell goes on only once the test has read its first line, which it can only have
    # read if that line was sent while the cell was still running.
    release = tmp_path / "release"
    code = (
        "print('first', flush=True)\n"
        + until_exists(release)
        + "print('released' if found else 'never released')"
    )
    received: list[dict[str, Any]] = []
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{served.url}/execute", json=body_for(code)) as response,
    ):
        for line in response.iter_lines():
            assert line, "no blank lines"
            received.append(json.loads(line))
            if (received[-1]["type"], received[-1].get("text")) == ("stdout", "first\n"):
                release.touch()
    stdout = "".join(e["text"] for e in received if e["type"] == "stdout")
    assert stdout == "first\nreleased\n"
    assert received[-1]["type"] == "end_of_execution"


def test_disconnect_does_not_wedge_the_context(served: Served) -> None:
    body = {"code": "import time; time.sleep(30)", "context_id": None, "language": None}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{served.url}/execute", json={**body, "env_vars": None}) as r:
            first = next(r.iter_lines())
            assert json.loads(first)["type"] == "number_of_executions"
        start = time.monotonic()
        events = execute(served, "'free'")
    assert events[-2]["text"] == "free"
    assert time.monotonic() - start < 5


def test_contexts_run_in_parallel(served: Served, tmp_path: Path) -> None:
    with httpx.Client(timeout=60) as client:
        other = client.post(f"{served.url}/contexts", json={"cwd": str(tmp_path)}).json()

    def meet(mine: Path, theirs: Path) -> str:
        """A cell that leaves `mine` and waits for `theirs`: only a cell running at the same
        time as the other one finds it."""
        return (
            f"import pathlib; pathlib.Path({str(mine)!r}).touch()\n"
            + until_exists(theirs)
            + "found"
        )

    one, two = tmp_path / "one", tmp_path / "two"
    cells = [(meet(one, two), None), (meet(two, one), other["id"])]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda cell: execute(served, cell[0], context_id=cell[1]), cells))
    assert [events[-2]["text"] for events in results] == ["True", "True"]


def test_executions_in_one_context_queue(served: Served, tmp_path: Path) -> None:
    log, release = tmp_path / "log", tmp_path / "release"
    first = (
        f"open({str(log)!r}, 'a').write('first began\\n')\n"
        + until_exists(release)
        + f"open({str(log)!r}, 'a').write('first ended\\n')"
    )
    second = f"open({str(log)!r}, 'a').write('second ran\\n')"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(execute, served, first)
        assert wait_until(log.exists, timeout=30)
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{served.url}/execute", json=body_for(second)) as response,
        ):
            # Answered, so the agent has the second cell, and it waits behind the first.
            assert response.status_code == 200
            assert log.read_text() == "first began\n"
            release.touch()
            queued = [json.loads(line) for line in response.iter_lines()]
        assert "error" not in {e["type"] for e in running.result(timeout=60)}
    assert log.read_text() == "first began\nfirst ended\nsecond ran\n"
    assert "error" not in {e["type"] for e in queued}
    assert queued[-1]["type"] == "end_of_execution"


def test_stdin_is_refused_not_awaited(served: Served) -> None:
    events = execute(served, "input('? ')")
    assert [e["name"] for e in events if e["type"] == "error"] == ["StdinNotImplementedError"]


def test_dead_kernel_reports_and_recovers(served: Served, tmp_path: Path) -> None:
    with httpx.Client(timeout=60) as client:
        ctx = client.post(f"{served.url}/contexts", json={"cwd": str(tmp_path)}).json()
    execute(served, "z = 1", context_id=ctx["id"])
    events = execute(served, "import os; os._exit(3)", context_id=ctx["id"])
    assert [e["name"] for e in events if e["type"] == "error"] == ["DeadKernelError"]
    events = execute(served, "'z' in dir()", context_id=ctx["id"])
    assert events[-2]["text"] == "False"


def test_kernels_are_the_oom_killers_candidates(sbx: Any) -> None:
    # A cell that fills the sandbox's memory takes its kernel down, not the agent.
    ex = sbx.run_code("open('/proc/self/oom_score_adj').read().strip()")
    assert ex.text == "1000"


# -- HTTP errors and housekeeping -------------------------------------------------------------


def test_http_errors(served: Served) -> None:
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{served.url}/execute", json={"code": "1", "context_id": "nope"})
        assert r.status_code == 404
        assert r.json()["code"] == 404
        assert "nope" in r.json()["message"]

        r = client.post(f"{served.url}/execute", json={"code": "1", "language": "javascript"})
        assert r.status_code == 400
        assert r.json() == {
            "code": 400,
            "message": "language 'javascript' is not supported in this sandbox; available: python",
        }
        r = client.post(f"{served.url}/contexts", json={"language": "r"})
        assert r.status_code == 400

        r = client.post(f"{served.url}/contexts", json={"cwd": "/does/not/exist"})
        assert r.status_code == 400
        assert "/does/not/exist" in r.json()["message"]

        r = client.post(f"{served.url}/execute", content=b"not json")
        assert r.status_code == 400

        assert client.delete(f"{served.url}/contexts/nope").status_code == 404
        assert client.post(f"{served.url}/contexts/nope/restart").status_code == 404
        r = client.get(f"{served.url}/no/such/route")
        assert r.status_code == 404
        assert r.json()["code"] == 404
        assert client.get(f"{served.url}/health").status_code == 204


def test_default_context_is_listed_with_home_cwd(served: Served, home: Path) -> None:
    with httpx.Client(timeout=30) as client:
        contexts = client.get(f"{served.url}/contexts").json()
    assert {"language": "python", "cwd": str(home)}.items() <= contexts[0].items()
    # A str result, not a tuple: IPython would break a long tuple's repr across lines.
    events = execute(served, "import os; os.getcwd() + ' ' + os.environ['HOME']")
    assert events[-2]["text"] == f"{home} {home}"


def test_access_token_guards_execute_only(served: Served) -> None:
    served.call(served.env.init(access_token="s3cret"))
    try:
        with httpx.Client(timeout=30) as client:
            body = {"code": "1", "context_id": None, "language": None, "env_vars": None}
            r = client.post(f"{served.url}/execute", json=body)
            assert r.status_code == 401
            r = client.post(
                f"{served.url}/execute", json=body, headers={"X-Access-Token": "s3cret"}
            )
            assert r.status_code == 200
            assert client.get(f"{served.url}/contexts").status_code == 200
    finally:
        served.env.access_token = None


def test_kernels_run_as_the_default_user(home: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    tmp_path.chmod(0o777)
    with serve(sandbox_env(home, default_user="nobody")) as s:
        events = execute(s, "import os; os.getuid(), os.getgroups(), os.getcwd()")
        assert events[-2]["text"] == "(65534, [], '/')"
        r = httpx.post(f"{s.url}/contexts", json={"cwd": str(tmp_path)}, timeout=60)
        assert r.status_code == 200
        events = execute(s, "open('f', 'w').write('x')", context_id=r.json()["id"])
        assert events[-2]["text"] == "1"
        assert (tmp_path / "f").stat().st_uid == 65534
        # /init names another default user: the kernels follow it.
        s.call(s.env.init(default_user="root"))
        events = execute(s, "import os; f'{os.getuid()} {os.getcwd()}'")
        assert events[-2]["text"] == f"0 {home}"
