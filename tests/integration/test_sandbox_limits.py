"""The issue's "done when", through the real SDK on a default sandbox (512 MiB memory, 1 GiB
disk): a 2 GB write gets ENOSPC and a 64 GB allocation is killed, the sandbox answers after
each, and both show in the metrics (the sandbox's own, and the service's Prometheus ones)."""

from __future__ import annotations

import httpx
import pytest
from e2b import CommandExitException, Sandbox
from prometheus_client.parser import text_string_to_metric_families

from .gateway_process import API_KEY, GatewayProcess, wait_for

pytestmark = pytest.mark.integration

GIB = 1 << 30


def _oom_kills(gateway: GatewayProcess) -> float:
    text = httpx.get(f"{gateway.url}/metrics", headers={"X-API-Key": API_KEY}).text
    for family in text_string_to_metric_families(text):
        if family.name == "coppice_oom_kills":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no coppice_oom_kills_total in /metrics")


def test_a_write_past_the_disk_is_enospc_and_the_sandbox_lives(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create(timeout=180)
    try:
        with pytest.raises(CommandExitException) as info:
            sbx.commands.run("dd if=/dev/zero of=/home/user/big bs=1M count=2048", timeout=120)
        assert "No space left on device" in info.value.stderr
        assert sbx.commands.run("echo alive").stdout == "alive\n"

        def full() -> bool:
            found = sbx.get_metrics()
            return bool(found) and found[-1].disk_used >= 0.9 * found[-1].disk_total

        # readings come every 5 s
        assert wait_for(full, timeout_s=20), sbx.get_metrics()
        last = sbx.get_metrics()[-1]
        assert last.disk_total <= GIB and last.mem_total == 512 << 20
        sbx.commands.run("rm /home/user/big")
        assert sbx.commands.run("echo still").stdout == "still\n"
    finally:
        sbx.kill()


def test_a_64_gb_allocation_is_killed_and_the_sandbox_lives(gateway: GatewayProcess) -> None:
    before = _oom_kills(gateway)
    sbx = Sandbox.create(timeout=180)
    try:
        # 64 GiB mapped without reserve (MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE: the host's
        # overcommit heuristic would refuse it up front otherwise), then every page touched:
        # the OOM killer, not a refused allocation, ends it.
        hog = (
            'python3 -c "import mmap; m = mmap.mmap(-1, 64 << 30, flags=0x4022);'
            ' [m.__setitem__(i, 1) for i in range(0, 64 << 30, 4096)]"'
        )
        with pytest.raises(CommandExitException) as info:
            sbx.commands.run(hog, timeout=120)
        assert info.value.exit_code != 0
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        assert wait_for(lambda: _oom_kills(gateway) > before, timeout_s=20)
        # The plain way to ask is refused at once (more than the host's memory and swap).
        with pytest.raises(CommandExitException):
            sbx.commands.run("python3 -c 'bytearray(64 << 30)'", timeout=60)
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        found = sbx.get_metrics()
        assert found and found[-1].mem_used <= found[-1].mem_total
    finally:
        sbx.kill()
