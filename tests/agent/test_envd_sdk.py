"""The unmodified e2b SDK against the envd app: the compatibility this package exists for."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox, TimeoutException
from e2b.exceptions import FileNotFoundException

from tests.agent.envd_harness import (
    EnvdServer,
    process_exists,
    running_envd,
    sandbox_env,
    sdk_options,
)
from tests.waiting import wait_until

TOKEN = "sdk-token"


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[EnvdServer]:
    env = sandbox_env(home, access_token=TOKEN)
    with running_envd(env) as server:
        yield server


@pytest.fixture(scope="module")
def sandbox(server: EnvdServer) -> Sandbox:
    return Sandbox(**sdk_options(server, TOKEN))


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


def _listed(sandbox: Sandbox, marker: str) -> bool:
    return any(marker in " ".join(p.args) for p in sandbox.commands.list())


def test_command_timeout_raises_timeout_and_kills_it(sandbox: Sandbox) -> None:
    marker = "sync-foreground-timeout"
    with pytest.raises(TimeoutException):
        sandbox.commands.run(f"sleep 30; : {marker}", timeout=1)
    assert wait_until(lambda: not _listed(sandbox, marker))

    handle = sandbox.commands.run("sleep 30", background=True, timeout=1)
    with pytest.raises(TimeoutException):
        handle.wait()
    assert wait_until(lambda: not process_exists(handle.pid))

    # Nobody following the stream any more does not lift the deadline.
    detached = sandbox.commands.run("sleep 30", background=True, timeout=1)
    detached.disconnect()
    assert process_exists(detached.pid)
    assert wait_until(lambda: not process_exists(detached.pid))


def test_async_command_timeout_raises_timeout_and_kills_it(
    server: EnvdServer, sandbox: Sandbox
) -> None:
    marker = "async-foreground-timeout"

    async def run() -> int:
        sbx = AsyncSandbox(**sdk_options(server, TOKEN))
        # An end event would make this CommandExitException (exit code -1, "signal: killed").
        with pytest.raises(TimeoutException):
            await sbx.commands.run(f"sleep 30; : {marker}", timeout=1)
        handle = await sbx.commands.run("sleep 30", background=True, timeout=1)
        with pytest.raises(TimeoutException):
            await handle.wait()
        return int(handle.pid)

    pid = asyncio.run(run())
    assert wait_until(lambda: not process_exists(pid))
    assert not _listed(sandbox, marker)


def test_connect_timeout_ends_the_stream_not_the_process(
    server: EnvdServer, sandbox: Sandbox
) -> None:
    handle = sandbox.commands.run("sleep 30", background=True)
    try:
        with pytest.raises(TimeoutException):
            sandbox.commands.connect(handle.pid, timeout=1).wait()

        async def connect() -> None:
            sbx = AsyncSandbox(**sdk_options(server, TOKEN))
            attached = await sbx.commands.connect(handle.pid, timeout=1)
            with pytest.raises(TimeoutException):
                await attached.wait()

        asyncio.run(connect())
        assert handle.pid in [p.pid for p in sandbox.commands.list()]
    finally:
        sandbox.commands.kill(handle.pid)


def test_files(sandbox: Sandbox, tmp_path: Path) -> None:
    path = f"{tmp_path}/sdk/a.txt"
    assert sandbox.files.write(path, "hi").path == path
    assert sandbox.files.read(path) == "hi"
    assert sandbox.files.exists(path)
    assert sandbox.files.make_dir(f"{tmp_path}/made")
    assert not sandbox.files.make_dir(f"{tmp_path}/made")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{tmp_path}/missing")


def test_remove_of_a_missing_path_succeeds(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.files.remove(f"{tmp_path}/never-there")
    sandbox.files.remove(f"{tmp_path}/no/such/parent")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("x")
    sandbox.files.remove(f"{tmp_path}/tree")
    assert not (tmp_path / "tree").exists()
    sandbox.files.remove(f"{tmp_path}/tree")


def test_read_a_proc_file(sandbox: Sandbox) -> None:
    # stat says 0 bytes; the content is generated as it is read.
    status = sandbox.files.read("/proc/self/status")
    assert status.startswith("Name:")
    assert "\nPid:" in status
    assert bytes(sandbox.files.read("/proc/self/status", format="bytes")).startswith(b"Name:")
    assert b"".join(sandbox.files.read("/proc/self/status", format="stream")).startswith(b"Name:")


def test_read_gzip(sandbox: Sandbox, tmp_path: Path) -> None:
    text = "compressible line\n" * 5000
    (tmp_path / "big.txt").write_text(text)
    assert sandbox.files.read(f"{tmp_path}/big.txt", gzip=True) == text
    assert sandbox.files.read("/proc/self/status", gzip=True).startswith("Name:")
