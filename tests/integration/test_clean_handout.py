"""A sandbox handed out never holds anything of one before it: through the real SDK, one
sandbox leaves a process, files (home, /tmp, /dev/shm), an environment variable in a shell
start-up file and a kernel variable behind, and the sandboxes created after it see none."""

from __future__ import annotations

import pytest
from e2b_code_interpreter import Sandbox as CodeSandbox

from .gateway_process import GatewayProcess

pytestmark = pytest.mark.integration

LEAVE = (
    "setsid sleep 613 </dev/null >/dev/null 2>&1 & "
    "echo left > /tmp/left; echo left > /dev/shm/left; echo left > ~/left; "
    "echo 'export LEFT_BEHIND=1' >> ~/.bashrc; echo 'export LEFT_BEHIND=1' >> ~/.profile"
)
LOOK = (
    # -x: the process's own name, not a command line (this shell's names `sleep 613` too)
    "pgrep -x sleep >/dev/null && echo found-process || echo no-process; "
    "for f in /tmp/left /dev/shm/left ~/left; do test -e $f && echo found $f; done; "
    'echo "env=${LEFT_BEHIND:-unset}"'
)


def test_nothing_of_one_sandbox_reaches_the_next(gateway: GatewayProcess) -> None:
    first = CodeSandbox.create()
    try:
        first.commands.run(LEAVE)
        assert first.run_code("left_behind = 42; left_behind").text == "42"
        assert "found /tmp/left" in first.commands.run(LOOK).stdout  # it was really left
    finally:
        first.kill()
    seen = {first.sandbox_id}
    # More sandboxes than the pool holds: some from the pool, some started since the kill.
    for _ in range(4):
        nxt = CodeSandbox.create()
        try:
            assert nxt.sandbox_id not in seen
            seen.add(nxt.sandbox_id)
            looked = nxt.commands.run(LOOK).stdout
            assert "no-process" in looked and "found" not in looked, looked
            assert "env=unset" in looked, looked
            result = nxt.run_code("left_behind")
            assert result.error is not None and result.error.name == "NameError"
        finally:
            nxt.kill()
