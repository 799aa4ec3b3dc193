"""The template's settings inside the whole agent: its start command (a listed process), its
ready command gating `/ready`, and its user, workdir and env vars as every command's and
kernel's defaults, with what a request names winning."""

from __future__ import annotations

import json
import os
import pwd
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from connectrpc.codec import proto_json_codec

from coppice_agent.output_tail import OutputTail
from coppice_agent.rpc.process.process_connect import ProcessClientSync
from coppice_agent.rpc.process.process_pb import ListRequest, ProcessConfig, StartRequest
from coppice_agent.server import environment_for
from coppice_agent.template_config import TemplateConfig
from tests.agent.envd_harness import (
    AgentServer,
    basic_auth,
    loopback_socket,
    running_agent,
    sandbox_env,
)
from tests.waiting import wait_until

NOBODY = pwd.getpwnam("nobody")


def ready(server: AgentServer) -> httpx.Response:
    return httpx.get(f"{server.envd_url}/ready", timeout=5)


def settled(server: AgentServer, timeout: float = 60) -> httpx.Response:
    """The first /ready answer that is not 503 ("not yet")."""
    answers: list[httpx.Response] = []

    def answered() -> bool:
        answers.append(ready(server))
        return answers[-1].status_code != 503

    assert wait_until(answered, timeout=timeout, interval=0.05), answers[-1].text
    return answers[-1]


def free_port() -> int:
    sock = loopback_socket()
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def run(server: AgentServer, cmd: str, **request: Any) -> tuple[int, str]:
    """`bash -c cmd` to its end, as the SDK's commands.run; its exit code and stdout."""
    headers = request.pop("headers", {})
    config = ProcessConfig(cmd="/bin/bash", args=["-c", cmd], **request)
    with ProcessClientSync(server.envd_url, codec=proto_json_codec()) as client:
        stdout, code = b"", None
        for response in client.start(StartRequest(process=config), headers=headers):
            event = response.event
            if event is None or event.event is None:
                continue
            if event.event.field == "data" and event.event.value.output is not None:
                if event.event.value.output.field == "stdout":
                    stdout += event.event.value.output.value
            elif event.event.field == "end":
                code = event.event.value.exit_code
    assert code is not None
    return code, stdout.decode()


def listed(server: AgentServer) -> list[ProcessConfig]:
    with ProcessClientSync(server.envd_url, codec=proto_json_codec()) as client:
        found = client.list(ListRequest()).processes
    return [info.config for info in found if info.config is not None]


# -- start and ready --------------------------------------------------------------------------


def test_ready_waits_for_the_ready_command_and_the_start_command_is_listed(
    home: Path, tmp_path: Path
) -> None:
    port = free_port()
    # Serves only once the test says so, so that /ready is seen waiting on the ready command.
    start_cmd = (
        "while [ ! -e go ]; do sleep 0.05; done; "
        f"exec /usr/bin/python3 -m http.server {port} --bind 127.0.0.1"
    )
    template = TemplateConfig(
        start_cmd=start_cmd, ready_cmd=f'[ -n "$(ss -Htuln sport = :{port})" ]'
    )
    env = sandbox_env(home, default_workdir=str(tmp_path))
    (tmp_path / "hello.txt").write_text("hi")
    with running_agent(env, template) as server:
        assert wait_until(lambda: server.agent.interpreter.is_ready, timeout=60)
        waiting = ready(server)
        assert waiting.status_code == 503
        assert "ready command" in waiting.json()["message"]
        (tmp_path / "go").touch()
        assert settled(server).status_code == 204
        assert httpx.get(f"http://127.0.0.1:{port}/hello.txt", timeout=5).text == "hi"
        start = [c for c in listed(server) if c.args[-1:] == [start_cmd]]
        assert len(start) == 1, listed(server)
        assert start[0].cmd == "/bin/bash"
        assert start[0].cwd == str(tmp_path)


def test_a_start_command_that_fails_fails_ready_with_its_last_output(home: Path) -> None:
    start_cmd = "for i in $(seq 1 40); do echo line $i; done; echo oops >&2; exit 3"
    template = TemplateConfig(start_cmd=start_cmd, ready_cmd="false")
    with running_agent(sandbox_env(home), template) as server:
        answer = settled(server, timeout=20)
        assert answer.status_code == 500
        message = answer.json()["message"]
        assert "start command" in message and "exit status 3" in message
        assert "oops" in message and "line 40" in message
        # The last lines only, not everything it printed.
        assert "line 5\n" not in message
        assert server.agent.startup.failure == message


def test_a_ready_command_that_never_passes_fails_at_its_deadline(home: Path) -> None:
    template = TemplateConfig(ready_cmd="echo not listening yet; false", ready_timeout_s=1)
    with running_agent(sandbox_env(home), template) as server:
        answer = settled(server, timeout=20)
    assert answer.status_code == 500
    message = answer.json()["message"]
    assert "did not pass within 1 s" in message and "not listening yet" in message


def test_a_start_command_that_exits_0_leaves_the_verdict_to_the_ready_command(
    home: Path,
) -> None:
    # E2B's own example: `echo $HELLO` with wait_for_timeout, which is a `sleep` that must
    # get to finish even though it takes longer than one retry interval.
    template = TemplateConfig(start_cmd="echo $HELLO", ready_cmd="sleep 1.5", ready_timeout_s=30)
    env = sandbox_env(home, template_envs={"HELLO": "hi"})
    with running_agent(env, template) as server:
        assert settled(server).status_code == 204
        assert server.agent.startup.passed


def test_stopping_the_agent_ends_a_ready_check_still_running(home: Path) -> None:
    marker = f"ready-check-{uuid.uuid4().hex}"
    # Not a lone `sleep`, which sh would exec: the shell stays, with the marker in its argv.
    template = TemplateConfig(ready_cmd=f"sleep 100; echo {marker}")
    with running_agent(sandbox_env(home), template) as server:
        assert wait_until(lambda: shells_with(marker), timeout=10)
        assert ready(server).status_code == 503
    assert wait_until(lambda: not shells_with(marker), timeout=10)


def shells_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile
    return found


def test_no_template_start_leaves_ready_to_the_kernel(home: Path) -> None:
    with running_agent(sandbox_env(home)) as server:
        assert settled(server).status_code == 204


# -- the template's user, workdir and env vars as defaults ------------------------------------


@pytest.fixture
def as_nobody(tmp_path: Path) -> tuple[TemplateConfig, Path]:
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    workdir = tmp_path / "work"
    workdir.mkdir()
    workdir.chmod(0o777)
    tmp_path.chmod(0o755)
    config = TemplateConfig(
        user="nobody", workdir=str(workdir), envs={"TPL": "template", "BOTH": "template"}
    )
    return config, workdir


def test_commands_default_to_the_templates_user_workdir_and_envs(
    as_nobody: tuple[TemplateConfig, Path],
) -> None:
    config, workdir = as_nobody
    env = environment_for(config, {})
    with running_agent(env, config) as server:
        assert httpx.post(
            f"{server.envd_url}/init", json={"envVars": {"BOTH": "sandbox"}}, timeout=5
        ).is_success
        code, out = run(server, 'id -u; pwd; echo "$TPL $BOTH"')
        assert code == 0
        assert out.split("\n")[:3] == [str(NOBODY.pw_uid), str(workdir), "template sandbox"]
        # What the request names wins over every default.
        code, out = run(
            server,
            'id -u; pwd; echo "$TPL $BOTH"',
            cwd="/",
            envs={"TPL": "request"},
            headers=basic_auth("root"),
        )
        assert code == 0
        assert out.split("\n")[:3] == ["0", "/", "request sandbox"]


def test_kernels_default_to_the_templates_user_workdir_and_envs(
    as_nobody: tuple[TemplateConfig, Path],
) -> None:
    config, workdir = as_nobody
    with running_agent(environment_for(config, {}), config) as server:
        assert wait_until(lambda: ready(server).status_code == 204, timeout=60)
        body = {
            "code": "import os; f\"{os.getuid()} {os.getcwd()} {os.environ['TPL']}\"",
            "context_id": None,
            "language": None,
            "env_vars": None,
        }
        answer = httpx.post(f"{server.interpreter_url}/execute", json=body, timeout=60)
        events = [json.loads(line) for line in answer.text.splitlines()]
        results = [e["text"] for e in events if e.get("type") == "result"]
        assert results == [f"{NOBODY.pw_uid} {workdir} template"]
        contexts = httpx.get(f"{server.interpreter_url}/contexts", timeout=10).json()
        assert contexts[0]["cwd"] == str(workdir)


def test_the_start_command_runs_as_the_templates_user_in_its_workdir(
    as_nobody: tuple[TemplateConfig, Path],
) -> None:
    config, workdir = as_nobody
    template = TemplateConfig(
        user=config.user,
        workdir=config.workdir,
        envs=config.envs,
        start_cmd='echo "$(id -u) $(pwd) $TPL" > started; sleep 100',
        ready_cmd="test -s started",
    )
    with running_agent(environment_for(template, {}), template) as server:
        assert settled(server).status_code == 204
    assert (workdir / "started").read_text() == f"{NOBODY.pw_uid} {workdir} template\n"
    assert (workdir / "started").stat().st_uid == NOBODY.pw_uid


# -- the output tail --------------------------------------------------------------------------


def test_output_tail_keeps_the_last_lines_of_both_streams() -> None:
    tail = OutputTail(3)
    tail.feed("stdout", b"one\ntwo\nthr")
    tail.feed("stderr", b"err\n")
    tail.feed("stdout", b"ee\nfour")
    # stdout's "three" came in two chunks around stderr's line; "four" is still unfinished.
    assert tail.lines() == ["err", "three", "four"]
    tail.feed("stdout", b"x" * 2000 + b"\n")
    assert tail.lines()[-1].endswith("…") and len(tail.lines()[-1]) == 501
