"""An image without ipykernel is still a sandbox: the agent becomes ready (commands and
files work) and run_code answers saying what to install, instead of the warm timing out."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from coppice_agent.interpreter import BadContextRequest, Interpreter
from coppice_agent.kernel_specs import KernelCatalog
from tests.agent.envd_harness import sandbox_env

#: Debian's own python3 has no ipykernel (the host venv's has)
BARE_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(shutil.which(BARE_PYTHON) is None, reason="needs Debian's python3")
def test_no_ipykernel_means_ready_without_a_kernel_and_a_clear_run_code_error(
    tmp_path: Path,
) -> None:
    interpreter = Interpreter(
        sandbox_env(tmp_path),
        kernel_argv=(BARE_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"),
        kernels=KernelCatalog(kernel_dirs=[str(tmp_path / "no-kernels")]),
    )

    async def scenario() -> str:
        await interpreter.start()
        assert interpreter.is_ready
        try:
            await interpreter.default_context()
        except BadContextRequest as exc:
            return str(exc)
        finally:
            await interpreter.shutdown()
        raise AssertionError("a context started without ipykernel")

    message = asyncio.run(scenario())
    assert "no ipykernel" in message and "pip install ipykernel" in message


def test_a_lazy_template_is_ready_without_a_kernel_and_starts_one_on_first_use(
    tmp_path: Path,
) -> None:
    interpreter = Interpreter(sandbox_env(tmp_path))

    async def scenario() -> None:
        await interpreter.start(warm=False)
        try:
            assert interpreter.is_ready and not interpreter._contexts  # no kernel at warm
            ctx = await interpreter.default_context()  # the first run_code's
            assert ctx.kernel.usable
            assert await interpreter.default_context() is ctx
        finally:
            await interpreter.shutdown()

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which(BARE_PYTHON) is None, reason="needs Debian's python3")
def test_a_lazy_template_without_ipykernel_says_so_on_first_use(tmp_path: Path) -> None:
    interpreter = Interpreter(
        sandbox_env(tmp_path),
        kernel_argv=(BARE_PYTHON, "-m", "ipykernel_launcher", "-f", "{connection_file}"),
        kernels=KernelCatalog(kernel_dirs=[str(tmp_path / "no-kernels")]),
    )

    async def scenario() -> None:
        await interpreter.start(warm=False)
        try:
            with pytest.raises(BadContextRequest, match="no ipykernel"):
                await interpreter.default_context()
        finally:
            await interpreter.shutdown()

    asyncio.run(scenario())
