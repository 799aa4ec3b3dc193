"""The unmodified e2b SDK against the envd app: the compatibility this package exists for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import CommandExitException, ConnectionConfig, Sandbox
from e2b.exceptions import FileNotFoundException
from packaging.version import Version

from coppice_agent.environment import SandboxEnvironment
from tests.agent.envd_harness import running_envd


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    env = SandboxEnvironment(default_user="root", access_token="sdk-token")
    with running_envd(env) as server:
        # What Sandbox.create builds from the control plane's answer, minus the control plane.
        config = ConnectionConfig(
            api_key="unused",
            sandbox_url=server.url,
            extra_sandbox_headers={"E2b-Sandbox-Id": "sbx-test", "X-Access-Token": "sdk-token"},
        )
        yield Sandbox(
            sandbox_id="sbx-test",
            sandbox_domain=None,
            envd_version=Version("0.5.7"),
            envd_access_token="sdk-token",
            traffic_access_token=None,
            connection_config=config,
        )


def test_commands(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo hello; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("hello\n", "err\n", 0)
    with pytest.raises(CommandExitException) as info:
        sandbox.commands.run("exit 3")
    assert info.value.exit_code == 3

    handle = sandbox.commands.run("sleep 30", background=True)
    assert handle.pid in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(handle.pid)
    with pytest.raises(CommandExitException):
        handle.wait()
    assert not sandbox.commands.kill(handle.pid)


def test_files(sandbox: Sandbox, tmp_path: Path) -> None:
    path = f"{tmp_path}/sdk/a.txt"
    assert sandbox.files.write(path, "hi").path == path
    assert sandbox.files.read(path) == "hi"
    assert sandbox.files.exists(path)
    assert sandbox.files.make_dir(f"{tmp_path}/made")
    assert not sandbox.files.make_dir(f"{tmp_path}/made")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{tmp_path}/missing")
