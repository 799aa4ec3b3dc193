"""The whole agent (`server.Agent`): one owner starts envd and the code interpreter and stops
them however serving ends, in a thread as in the tests or by SIGTERM as in a sandbox."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from connectrpc.codec import proto_json_codec

from coppice_agent.rpc.filesystem.filesystem_connect import FilesystemClientSync
from coppice_agent.rpc.filesystem.filesystem_pb import CreateWatcherRequest
from coppice_agent.rpc.process.process_connect import ProcessClientSync
from coppice_agent.rpc.process.process_pb import ProcessConfig, StartRequest
from coppice_agent.server import Agent
from tests.agent.envd_harness import (
    inotify_descriptors,
    live_group_members,
    loopback_socket,
    sandbox_env,
)
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Running:
    envd_url: str
    #: the agent's process (the test's own when the agent runs in a thread)
    pid: int

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.envd_url}/ready", timeout=5).status_code == 204
        except httpx.TransportError:
            return False

    def start_tree(self) -> int:
        """Start `sleep 100 & sleep 100` and leave it running; its process group."""
        with ProcessClientSync(self.envd_url, codec=proto_json_codec()) as client:
            request = StartRequest(
                process=ProcessConfig(cmd="/bin/bash", args=["-c", "sleep 100 & sleep 100"])
            )
            stream = client.start(request)
            first = next(stream).event
            assert first is not None and first.event is not None
            assert first.event.field == "start"
            pid = first.event.value.pid
            stream.close()  # type: ignore[attr-defined]
        assert wait_until(lambda: len(live_group_members(pid)) >= 3)
        return pid

    def watch(self, directory: Path) -> None:
        with FilesystemClientSync(self.envd_url, codec=proto_json_codec()) as client:
            client.create_watcher(CreateWatcherRequest(path=str(directory)))

    def kernels(self) -> set[int]:
        return {pid for pid in children(self.pid) if b"ipykernel" in cmdline(pid)}


def children(parent: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def agent_in_a_thread(home: Path) -> Iterator[Running]:
    envd_sock, interpreter_sock = loopback_socket(), loopback_socket()
    ports = (envd_sock.getsockname()[1], interpreter_sock.getsockname()[1])
    agent = Agent(sandbox_env(home), ports=ports)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(
        target=loop.run_until_complete,
        args=(agent.serve([envd_sock, interpreter_sock]),),
        name="agent-under-test",
        daemon=True,
    )
    thread.start()
    assert wait_until(lambda: agent.serving or not thread.is_alive(), timeout=10)
    assert agent.serving, "the agent did not start"
    try:
        yield Running(f"http://127.0.0.1:{ports[0]}", pid=os.getpid())
    finally:
        agent.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the agent did not stop"
        loop.close()


def test_stopping_the_agent_stops_every_service(home: Path, tmp_path: Path) -> None:
    watchers_before = inotify_descriptors()
    with agent_in_a_thread(home) as running:
        assert wait_until(running.ready, timeout=60), "the default kernel did not warm up"
        kernels = running.kernels()
        assert kernels
        group = running.start_tree()
        running.watch(tmp_path)
        assert inotify_descriptors() - watchers_before
    # envd's stop: the process tree killed, the watcher closed; the interpreter's: no kernels.
    assert wait_until(lambda: not live_group_members(group))
    assert inotify_descriptors() - watchers_before == set()
    assert not any(alive(pid) for pid in kernels)


# The agent as `main()` runs it, minus logging set-up and the identity port: on the main
# thread, where uvicorn takes the stop signals. Prints its ports, then serves.
AGENT_PROCESS = """
import json, sys
from pathlib import Path
from coppice_agent.server import Agent, run
from tests.agent.envd_harness import loopback_socket, sandbox_env

sockets = [loopback_socket(), loopback_socket()]
ports = (sockets[0].getsockname()[1], sockets[1].getsockname()[1])
print(json.dumps(ports), flush=True)
run(Agent(sandbox_env(Path(sys.argv[1])), ports=ports), sockets)
"""


def test_sigterm_stops_every_service_before_the_agent_exits(home: Path, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    with log.open("w") as stderr:
        agent = subprocess.Popen(
            [sys.executable, "-c", AGENT_PROCESS, str(home)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert agent.stdout is not None
        envd_port, _ = json.loads(agent.stdout.readline())
        running = Running(f"http://127.0.0.1:{envd_port}", agent.pid)
        assert wait_until(running.ready, timeout=60), "the default kernel did not warm up"
        kernels = running.kernels()
        assert kernels
        group = running.start_tree()
        agent.send_signal(signal.SIGTERM)
        agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    # It ended by the signal, as uncaught, but only after its services had stopped.
    assert agent.returncode == -signal.SIGTERM, log.read_text()
    assert wait_until(lambda: not live_group_members(group))
    assert not any(alive(pid) for pid in kernels)
