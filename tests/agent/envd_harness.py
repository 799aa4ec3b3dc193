"""Runs the envd app under real uvicorn on a loopback ephemeral port, in a thread, for the
`test_envd_*` modules (and the whole agent, for the tests of what it starts itself); and the
sandbox environment those tests run in."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from connectrpc.codec import Codec, proto_json_codec
from e2b import ConnectionConfig
from packaging.version import Version

from coppice_agent.envd import Envd
from coppice_agent.environment import SandboxEnvironment
from coppice_agent.filesystem import FilesystemService
from coppice_agent.rpc.filesystem.filesystem_connect import FilesystemClientSync
from coppice_agent.rpc.process.process_connect import ProcessClientSync
from coppice_agent.server import Agent
from coppice_agent.template_config import TemplateConfig
from coppice_agent.users import SandboxUser
from tests.waiting import wait_until

T = TypeVar("T")


def sandbox_env(home: Path, **fields: Any) -> SandboxEnvironment:
    """A sandbox whose default user is root, with `home` for root's home: what the tests do
    through a relative path, `~` or $HOME (and what kernels keep under ~) stays in `home`
    instead of the real /root."""

    def lookup(name: str) -> SandboxUser:
        user = SandboxUser.lookup(name)
        return dataclasses.replace(user, home=str(home)) if user.uid == 0 else user

    fields.setdefault("default_user", "root")
    return SandboxEnvironment(lookup_user=lookup, **fields)


@dataclass
class EnvdServer:
    url: str
    env: SandboxEnvironment
    envd: Envd
    loop: asyncio.AbstractEventLoop

    def on_loop(self, read: Callable[[], T]) -> T:
        """`read()` run on the server's event loop, where the services' state lives."""

        async def call() -> T:
            return read()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)

    def processes(self, codec: Codec[Any, Any] | None = None) -> ProcessClientSync:
        # The SDK's settings: JSON, no compression either way.
        return ProcessClientSync(
            self.url,
            codec=codec or proto_json_codec(),
            send_compression=None,
            accept_compression=(),
        )

    def filesystem(self, codec: Codec[Any, Any] | None = None) -> FilesystemClientSync:
        return FilesystemClientSync(
            self.url,
            codec=codec or proto_json_codec(),
            send_compression=None,
            accept_compression=(),
        )


def basic_auth(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


@contextmanager
def running_envd(
    env: SandboxEnvironment,
    *,
    keepalive_interval: float = 30.0,
    filesystem: FilesystemService | None = None,
) -> Iterator[EnvdServer]:
    """envd serving on loopback until the block ends; then its services stop the way the
    agent stops them: `Envd.aclose` once the server has stopped. The loop is asyncio's own,
    as the agent's is (`asyncio.run`)."""
    envd = Envd(env, keepalive_interval=keepalive_interval, filesystem=filesystem)
    config = uvicorn.Config(
        envd.app,
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    loop = asyncio.new_event_loop()

    async def main() -> None:
        try:
            await server.serve()
        finally:
            await envd.aclose()

    thread = threading.Thread(
        target=loop.run_until_complete, args=(main(),), name="envd-under-test", daemon=True
    )
    thread.start()
    if not wait_until(lambda: server.started or not thread.is_alive(), timeout=10):
        raise RuntimeError("envd app did not start")
    if not server.started:
        raise RuntimeError("envd app stopped while starting")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield EnvdServer(url=f"http://127.0.0.1:{port}", env=env, envd=envd, loop=loop)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        if not thread.is_alive():
            loop.close()


@dataclass
class AgentServer:
    envd_url: str
    interpreter_url: str
    agent: Agent


@contextmanager
def running_agent(
    env: SandboxEnvironment, template: TemplateConfig | None = None
) -> Iterator[AgentServer]:
    """The whole agent (envd, the code interpreter, the template's start) on two loopback
    ports in a thread, until the block ends and it has stopped every service."""
    sockets = [loopback_socket(), loopback_socket()]
    ports = (sockets[0].getsockname()[1], sockets[1].getsockname()[1])
    agent = Agent(env, ports=ports, template=template)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(
        target=loop.run_until_complete,
        args=(agent.serve(sockets),),
        name="agent-under-test",
        daemon=True,
    )
    thread.start()
    if not wait_until(lambda: agent.serving or not thread.is_alive(), timeout=10):
        raise RuntimeError("the agent did not start")
    if not agent.serving:
        raise RuntimeError("the agent stopped while starting")
    try:
        yield AgentServer(f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}", agent)
    finally:
        agent.stop()
        thread.join(timeout=30)
        if thread.is_alive():
            raise RuntimeError("the agent did not stop")
        loop.close()


# What the gateway reports to the SDK: the envd features this agent implements.
ENVD_VERSION = "0.6.4"


def sdk_options(server: EnvdServer, token: str | None = None) -> dict[str, Any]:
    """Keyword arguments for the SDK's `Sandbox`/`AsyncSandbox` constructors: what
    `Sandbox.create` builds from the control plane's answer, minus the control plane."""
    headers = {"E2b-Sandbox-Id": "sbx-test"}
    if token is not None:
        headers["X-Access-Token"] = token
    return {
        "sandbox_id": "sbx-test",
        "sandbox_domain": None,
        "envd_version": Version(ENVD_VERSION),
        "envd_access_token": token,
        "traffic_access_token": None,
        "connection_config": ConnectionConfig(
            api_key="unused", sandbox_url=server.url, extra_sandbox_headers=headers
        ),
    }


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """`wait_until` for a test on the event loop, which has to keep running meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def live_group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def inotify_descriptors() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                fds.add(fd)
        except OSError:
            continue  # closed meanwhile
    return fds


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port, for a server to listen on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
