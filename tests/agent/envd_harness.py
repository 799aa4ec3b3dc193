"""Runs the envd app under real uvicorn on a loopback ephemeral port, in a thread, for the
`test_envd_*` modules."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from connectrpc.codec import Codec, proto_json_codec
from e2b import ConnectionConfig
from packaging.version import Version

from coppice_agent.envd import build_envd_app
from coppice_agent.environment import SandboxEnvironment
from coppice_agent.filesystem import FilesystemService
from coppice_agent.rpc.filesystem.filesystem_connect import FilesystemClientSync
from coppice_agent.rpc.process.process_connect import ProcessClientSync


@dataclass
class EnvdServer:
    url: str
    env: SandboxEnvironment

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
    app = build_envd_app(env, keepalive_interval=keepalive_interval, filesystem=filesystem)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="envd-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("envd app did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield EnvdServer(url=f"http://127.0.0.1:{port}", env=env)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
