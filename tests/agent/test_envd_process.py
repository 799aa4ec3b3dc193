"""process.Process over real HTTP: the generated sync client against the envd app."""

from __future__ import annotations

import grp
import json
import pwd
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.codec import proto_binary_codec
from connectrpc.errors import ConnectError
from protobuf import Oneof

from coppice_agent.rpc.filesystem.filesystem_pb import CreateWatcherRequest
from coppice_agent.rpc.process.process_connect import ProcessClientSync
from coppice_agent.rpc.process.process_pb import (
    PTY,
    CloseStdinRequest,
    ConnectRequest,
    ConnectResponse,
    ListRequest,
    ProcessConfig,
    ProcessEvent,
    ProcessInput,
    ProcessSelector,
    SendInputRequest,
    SendSignalRequest,
    Signal,
    StartRequest,
    StartResponse,
    StreamInputRequest,
    UpdateRequest,
)
from tests.agent.envd_harness import (
    EnvdServer,
    basic_auth,
    inotify_descriptors,
    live_group_members,
    running_envd,
    sandbox_env,
)
from tests.waiting import wait_until

KEEPALIVE = 0.2
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture(scope="module")
def envd(home: Path) -> Iterator[EnvdServer]:
    env = sandbox_env(home, env_vars={"SBX_WIDE": "yes", "OVERRIDE": "env"})
    with running_envd(env, keepalive_interval=KEEPALIVE) as server:
        yield server


@pytest.fixture
def client(envd: EnvdServer) -> Iterator[ProcessClientSync]:
    with envd.processes() as c:
        yield c


class Run:
    """Everything one Start/Connect stream delivered."""

    def __init__(self, events: list[ProcessEvent]) -> None:
        self.events = events

    def kinds(self) -> list[str]:
        return [e.event.field for e in self.events if e.event is not None]

    def output(self, field: str) -> bytes:
        out = b""
        for e in self.events:
            if e.event is not None and e.event.field == "data":
                choice = e.event.value.output
                if choice is not None and choice.field == field:
                    out += choice.value
        return out

    @property
    def end(self) -> ProcessEvent.EndEvent:
        last = self.events[-1].event
        assert last is not None and last.field == "end", self.kinds()
        return last.value

    @property
    def pid(self) -> int:
        first = self.events[0].event
        assert first is not None and first.field == "start"
        return first.value.pid


def bash(
    script: str,
    *,
    cwd: str | None = None,
    envs: dict[str, str] | None = None,
    stdin: bool = False,
    tag: str | None = None,
) -> StartRequest:
    return StartRequest(
        process=ProcessConfig(cmd="/bin/bash", args=["-c", script], envs=envs or {}, cwd=cwd),
        stdin=stdin,
        tag=tag,
    )


def events(stream: Iterator[StartResponse] | Iterator[ConnectResponse]) -> list[ProcessEvent]:
    return [r.event for r in stream if r.event is not None]


def collect(stream: Iterator[StartResponse] | Iterator[ConnectResponse]) -> Run:
    return Run(events(stream))


def started(stream: Iterator[StartResponse]) -> tuple[ProcessEvent, int]:
    """The start event off a fresh stream, and the pid it names."""
    event = next(stream).event
    assert event is not None and event.event is not None and event.event.field == "start"
    return event, event.event.value.pid


def pid_selector(pid: int) -> ProcessSelector:
    choice: Oneof[Literal["pid"], int] = Oneof("pid", pid)
    return ProcessSelector(selector=choice)


def tag_selector(tag: str) -> ProcessSelector:
    choice: Oneof[Literal["tag"], str] = Oneof("tag", tag)
    return ProcessSelector(selector=choice)


def stdin_bytes(data: bytes) -> ProcessInput:
    choice: Oneof[Literal["stdin"], bytes] = Oneof("stdin", data)
    return ProcessInput(input=choice)


def pty_bytes(data: bytes) -> ProcessInput:
    choice: Oneof[Literal["pty"], bytes] = Oneof("pty", data)
    return ProcessInput(input=choice)


def kill(client: ProcessClientSync, pid: int) -> None:
    client.send_signal(SendSignalRequest(process=pid_selector(pid), signal=Signal.SIGKILL))


def test_run_streams_stdout_stderr_and_exit(client: ProcessClientSync) -> None:
    run = collect(client.start(bash("echo hello; echo err >&2; echo again")))
    assert run.kinds()[0] == "start"
    assert run.output("stdout") == b"hello\nagain\n"
    assert run.output("stderr") == b"err\n"
    assert run.end.exit_code == 0
    assert run.end.exited
    assert run.end.status == "exit status 0"
    assert not run.end.has_field("error")


def test_nonzero_exit_reports_code_and_error(client: ProcessClientSync) -> None:
    run = collect(client.start(bash("exit 3")))
    assert run.end.exit_code == 3
    assert run.end.error == "exit status 3"


def test_binary_codec_works_too(envd: EnvdServer) -> None:
    with envd.processes(codec=proto_binary_codec()) as c:
        run = collect(c.start(bash("printf '\\x00\\xff'")))
    assert run.output("stdout") == b"\x00\xff"


def test_environment_layers(client: ProcessClientSync, home: Path) -> None:
    run = collect(
        client.start(bash('echo "$SBX_WIDE $OVERRIDE $HOME $USER"', envs={"OVERRIDE": "req"}))
    )
    assert run.output("stdout") == f"yes req {home} root\n".encode()


def test_cwd_and_missing_cwd(client: ProcessClientSync, tmp_path: Path) -> None:
    run = collect(client.start(bash("pwd", cwd=str(tmp_path))))
    assert run.output("stdout").decode().strip() == str(tmp_path)
    with pytest.raises(ConnectError) as info:
        collect(client.start(bash("pwd", cwd="/does/not/exist")))
    assert info.value.code == Code.INVALID_ARGUMENT


def test_runs_as_basic_auth_user(client: ProcessClientSync) -> None:
    run = collect(client.start(bash("id -u; echo $HOME"), headers=basic_auth("nobody")))
    uid, home = run.output("stdout").decode().split()
    assert int(uid) == 65534
    assert home == "/nonexistent"


def test_unknown_user_is_invalid_argument(client: ProcessClientSync) -> None:
    with pytest.raises(ConnectError) as info:
        collect(client.start(bash("true"), headers=basic_auth("no-such-user-here")))
    assert info.value.code == Code.INVALID_ARGUMENT


def test_keepalives_during_silence(client: ProcessClientSync) -> None:
    stream = client.start(bash("read line", stdin=True))
    first, pid = started(stream)
    seen = [first]
    # Silent until told otherwise: the stream must keep itself alive meanwhile.
    for response in stream:
        assert response.event is not None
        seen.append(response.event)
        if Run(seen).kinds()[-1] == "keepalive":
            break
    client.send_input(SendInputRequest(process=pid_selector(pid), input=stdin_bytes(b"\n")))
    run = Run([*seen, *events(stream)])
    assert "keepalive" in run.kinds()
    assert run.end.exit_code == 0


def test_background_tree_listed_and_killed_as_a_group(envd: EnvdServer) -> None:
    with envd.processes() as c:
        stream = c.start(bash("sleep 100 & sleep 100", tag="tree"))
        first, pid = started(stream)
        assert wait_until(lambda: len(live_group_members(pid)) >= 3)
        listed = {p.pid: p for p in c.list(ListRequest()).processes}
        assert pid in listed
        assert listed[pid].tag == "tree"
        config = listed[pid].config
        assert config is not None
        assert config.args == ["-c", "sleep 100 & sleep 100"]
        kill(c, pid)
        run = Run([first, *events(stream)])
        assert run.end.status == "signal: killed"
        assert run.end.exit_code == -1
        assert not run.end.exited
        assert wait_until(lambda: not live_group_members(pid))
        assert pid not in {p.pid for p in c.list(ListRequest()).processes}


def test_signal_by_tag_and_unknown_pid(client: ProcessClientSync) -> None:
    stream = client.start(bash("sleep 100", tag="by-tag"))
    started(stream)
    client.send_signal(SendSignalRequest(process=tag_selector("by-tag"), signal=Signal.SIGTERM))
    assert collect(stream).end.status == "signal: terminated"
    with pytest.raises(ConnectError) as info:
        client.send_signal(SendSignalRequest(process=pid_selector(999_999), signal=Signal.SIGKILL))
    assert info.value.code == Code.NOT_FOUND
    with pytest.raises(ConnectError) as info:
        collect(client.connect(ConnectRequest(process=pid_selector(999_999))))
    assert info.value.code == Code.NOT_FOUND


def followers(envd: EnvdServer, pid: int) -> int:
    """How many streams the service has following `pid` (-1: it is not running)."""

    def count() -> int:
        proc = envd.envd.processes.find(pid)
        return -1 if proc is None else proc.events.followers

    return envd.on_loop(count)


def test_disconnect_keeps_process_and_connect_reattaches(envd: EnvdServer) -> None:
    with envd.processes() as c:
        # It waits for its input, so it can only print once the test has reattached.
        stream = c.start(bash("read line; echo after:$line", stdin=True))
        _, pid = started(stream)
        stream.close()  # type: ignore[attr-defined]
        assert wait_until(lambda: followers(envd, pid) == 0)
        assert pid in {p.pid for p in c.list(ListRequest()).processes}
        attached = c.connect(ConnectRequest(process=pid_selector(pid)))
        first = next(attached).event
        assert first is not None
        c.send_input(SendInputRequest(process=pid_selector(pid), input=stdin_bytes(b"x\n")))
        run = Run([first, *events(attached)])
    assert run.pid == pid
    assert run.output("stdout") == b"after:x\n"
    assert run.end.exit_code == 0


def test_several_watchers_see_the_same_output(envd: EnvdServer) -> None:
    with envd.processes() as c, envd.processes() as other:
        stream = c.start(bash("read line; echo shared:$line", stdin=True))
        first, pid = started(stream)
        # A Connect stream follows from its start event on; the output comes after that.
        attached = other.connect(ConnectRequest(process=pid_selector(pid)))
        attached_first = next(attached).event
        assert attached_first is not None
        assert followers(envd, pid) == 2
        c.send_input(SendInputRequest(process=pid_selector(pid), input=stdin_bytes(b"x\n")))
        own = Run([first, *events(stream)])
        theirs = Run([attached_first, *events(attached)])
    assert own.output("stdout") == b"shared:x\n"
    assert theirs.output("stdout") == b"shared:x\n"
    assert theirs.pid == pid
    assert theirs.end.exit_code == 0


def test_stdin_send_input_and_close(envd: EnvdServer) -> None:
    with envd.processes() as c:
        stream = c.start(bash("cat; echo done", stdin=True))
        _, pid = started(stream)
        c.send_input(SendInputRequest(process=pid_selector(pid), input=stdin_bytes(b"hi\n")))
        c.close_stdin(CloseStdinRequest(process=pid_selector(pid)))
        run = collect(stream)
    assert run.output("stdout") == b"hi\ndone\n"


def test_stream_input(envd: EnvdServer) -> None:
    with envd.processes() as c:
        stream = c.start(bash("cat", stdin=True))
        _, pid = started(stream)

        def messages() -> Iterator[StreamInputRequest]:
            start: Oneof[Literal["start"], StreamInputRequest.StartEvent] = Oneof(
                "start", StreamInputRequest.StartEvent(process=pid_selector(pid))
            )
            yield StreamInputRequest(event=start)
            for chunk in (b"one ", b"two"):
                data: Oneof[Literal["data"], StreamInputRequest.DataEvent] = Oneof(
                    "data", StreamInputRequest.DataEvent(input=stdin_bytes(chunk))
                )
                yield StreamInputRequest(event=data)

        c.stream_input(messages())
        c.close_stdin(CloseStdinRequest(process=pid_selector(pid)))
        run = collect(stream)
    assert run.output("stdout") == b"one two"


def test_stdin_false_reads_dev_null(client: ProcessClientSync) -> None:
    run = collect(client.start(bash("cat; readlink /proc/self/fd/0")))
    assert run.output("stdout") == b"/dev/null\n"
    stream = client.start(bash("sleep 5"))
    _, pid = started(stream)
    try:
        with pytest.raises(ConnectError) as info:
            client.send_input(SendInputRequest(process=pid_selector(pid), input=stdin_bytes(b"x")))
        assert info.value.code == Code.FAILED_PRECONDITION
    finally:
        kill(client, pid)
        collect(stream)


def test_pty_start_input_and_resize(envd: EnvdServer) -> None:
    script = (
        "stty size; echo $TERM; tty >/dev/null && echo tty; read line; echo got:$line; stty size"
    )
    request = StartRequest(
        process=ProcessConfig(cmd="/bin/bash", args=["-c", script], envs={"TERM": "xterm"}),
        pty=PTY(size=PTY.Size(rows=24, cols=80)),
    )
    with envd.processes() as c:
        stream = c.start(request)
        first, pid = started(stream)
        so_far = [first]
        for response in stream:
            assert response.event is not None
            so_far.append(response.event)
            if b"tty" in Run(so_far).output("pty").split(b"\r\n"):
                break
        c.update(
            UpdateRequest(process=pid_selector(pid), pty=PTY(size=PTY.Size(rows=30, cols=100)))
        )
        c.send_input(SendInputRequest(process=pid_selector(pid), input=pty_bytes(b"x\n")))
        so_far.extend(events(stream))
    run = Run(so_far)
    text = run.output("pty").decode()
    assert "24 80" in text
    assert "xterm" in text
    assert "got:x" in text
    assert "30 100" in text
    assert run.end.exit_code == 0


def pty_request(script: str) -> StartRequest:
    # Not bash: it opens its stdin's terminal by name at start-up, which makes it the
    # controlling terminal of a session leader without one, and would hide whether the agent
    # did that. dash does nothing of the kind.
    return StartRequest(
        process=ProcessConfig(cmd="/bin/sh", args=["-c", script]),
        pty=PTY(size=PTY.Size(rows=24, cols=80)),
    )


def pty_lines(run: Run) -> list[str]:
    return run.output("pty").decode().split("\r\n")


def test_pty_is_the_controlling_terminal_and_ctrl_c_interrupts(envd: EnvdServer) -> None:
    # /dev/tty opens only for a process with a controlling terminal. `exec` leaves sleep as
    # the session's leader and its terminal's foreground job, which ^C interrupts.
    script = "if : </dev/tty 2>/dev/null; then echo has-ctty; else echo no-ctty; fi; exec sleep 100"
    with envd.processes() as c:
        stream = c.start(pty_request(script), timeout_ms=20_000)
        first, pid = started(stream)
        so_far = [first]
        for response in stream:
            assert response.event is not None
            so_far.append(response.event)
            if {"has-ctty", "no-ctty"} & set(pty_lines(Run(so_far))):
                break
        assert "has-ctty" in pty_lines(Run(so_far))
        c.send_input(SendInputRequest(process=pid_selector(pid), input=pty_bytes(b"\x03")))
        run = Run([*so_far, *events(stream)])
    assert run.end.status == "signal: interrupt"


def test_pty_runs_as_the_requested_user(client: ProcessClientSync) -> None:
    script = 'id -u; id -G; echo "$HOME"; : </dev/tty && echo has-ctty; stat -c %U "$(tty)"'
    run = collect(client.start(pty_request(script), headers=basic_auth("nobody")))
    uid, groups, home, ctty, owner = pty_lines(run)[:5]
    assert int(uid) == NOBODY.pw_uid
    member_of = {g.gr_gid for g in grp.getgrall() if "nobody" in g.gr_mem}
    assert {int(g) for g in groups.split()} == {NOBODY.pw_gid, *member_of}
    assert home == NOBODY.pw_dir
    assert ctty == "has-ctty"
    # The terminal is the user's own.
    assert owner == "nobody"
    assert run.end.exit_code == 0


def test_processes_start_as_the_oom_killers_candidates(client: ProcessClientSync) -> None:
    """So that in a sandbox out of memory a user process dies, not the agent."""
    agent_score = Path("/proc/self/oom_score_adj").read_text()  # the agent runs in-process
    # bash itself and what it forks: the value is set before the command runs.
    run = collect(client.start(bash("cat /proc/$$/oom_score_adj /proc/self/oom_score_adj")))
    assert run.output("stdout").split() == [b"1000", b"1000"]
    pty_run = collect(client.start(pty_request("cat /proc/self/oom_score_adj")))
    assert pty_lines(pty_run)[0] == "1000"
    as_user = collect(
        client.start(bash("cat /proc/self/oom_score_adj"), headers=basic_auth("nobody"))
    )
    assert as_user.output("stdout") == b"1000\n"
    assert Path("/proc/self/oom_score_adj").read_text() == agent_score


@pytest.mark.parametrize("cmd", ["/no/such/binary", "no-such-command-anywhere"])
def test_pty_command_not_found(client: ProcessClientSync, cmd: str) -> None:
    with pytest.raises(ConnectError) as info:
        collect(client.start(StartRequest(process=ProcessConfig(cmd=cmd), pty=PTY())))
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "No such file or directory" in info.value.message


def test_start_deadline_kills_the_process(client: ProcessClientSync) -> None:
    with pytest.raises(ConnectError) as info:
        collect(client.start(bash("sleep 30", tag="deadline"), timeout_ms=300))
    assert info.value.code in (Code.DEADLINE_EXCEEDED, Code.CANCELED)
    assert wait_until(
        lambda: all(p.tag != "deadline" for p in client.list(ListRequest()).processes)
    )


def connect_envelopes(body: bytes) -> list[tuple[int, Any]]:
    """(flags, JSON) of each message in a Connect streaming body."""
    messages = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        messages.append((flags, json.loads(body[5 : 5 + length])))
        body = body[5 + length :]
    return messages


def test_start_deadline_is_a_deadline_error_not_an_exit(envd: EnvdServer) -> None:
    # Raw HTTP: the generated client would enforce the same deadline itself and hide what
    # the server sends.
    request = json.dumps(
        {"process": {"cmd": "/bin/bash", "args": ["-c", "sleep 30"]}, "tag": "raw-deadline"}
    ).encode()
    response = httpx.post(
        f"{envd.url}/process.Process/Start",
        content=struct.pack(">BI", 0, len(request)) + request,
        headers={"Content-Type": "application/connect+json", "Connect-Timeout-Ms": "500"},
        timeout=10,
    )
    messages = connect_envelopes(response.content)
    kinds = [next(iter(m["event"])) for flags, m in messages if flags == 0]
    assert kinds[0] == "start"
    assert "end" not in kinds
    flags, end_of_stream = messages[-1]
    assert flags == 0x02
    assert end_of_stream["error"]["code"] == "deadline_exceeded"
    pid = messages[0][1]["event"]["start"]["pid"]
    assert wait_until(lambda: not live_group_members(pid))


@pytest.mark.parametrize("cmd", ["/no/such/binary", "no-such-command-anywhere"])
def test_command_not_found(client: ProcessClientSync, cmd: str) -> None:
    with pytest.raises(ConnectError) as info:
        collect(client.start(StartRequest(process=ProcessConfig(cmd=cmd))))
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "No such file or directory" in info.value.message


def test_no_processes_left_behind(client: ProcessClientSync) -> None:
    assert wait_until(lambda: not client.list(ListRequest()).processes)


def test_stopping_envd_kills_every_process_tree_and_closes_every_watcher(
    home: Path, tmp_path: Path
) -> None:
    before = inotify_descriptors()
    with running_envd(sandbox_env(home)) as server:
        with server.processes() as c:
            stream = c.start(bash("sleep 100 & sleep 100"))
            _, pid = started(stream)
            assert wait_until(lambda: len(live_group_members(pid)) >= 3)
            # Nobody follows it any more: only stopping envd can end it now.
            stream.close()  # type: ignore[attr-defined]
        with server.filesystem() as fs:
            fs.create_watcher(CreateWatcherRequest(path=str(tmp_path)))
        assert inotify_descriptors() - before
    assert wait_until(lambda: not live_group_members(pid))
    assert inotify_descriptors() - before == set()
