"""Sandboxes that die under `coppice serve`, seen through the real e2b SDK: the OOM killer
taking a jail's agent, and a crash, each killed from the host by pid (that sandbox's own
processes only); and the gateway's `GET /metrics`, parsed with Prometheus's own parser.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, SandboxException, SandboxNotFoundException
from prometheus_client.parser import text_string_to_metric_families

from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord

from .gateway_process import API_KEY, OTHER_TENANT_KEY, GatewayProcess, serving, wait_for

pytestmark = pytest.mark.integration

POOL = 2
#: more than any template's memory limit: the hog cannot fit
HOG = "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); b = b'x' * (3 << 30)"


@pytest.fixture(scope="module")
def python_gateway(
    cli_env: dict[str, str],
    template: TemplateRecord,
    controller: PoolController,
    instance_dir: Path,
) -> Iterator[GatewayProcess]:
    """`coppice serve` keeping a pool of the small `python` template."""
    log = instance_dir / "gateway-deaths.log"
    with serving(cli_env, log, {template.name: POOL}, controller.drain) as gw:
        yield gw


def _memory_cgroup(controller: PoolController, sandbox_id: str) -> Path:
    return Path("/sys/fs/cgroup/memory") / controller.settings.namespace / sandbox_id


def _agent_pid(controller: PoolController, sandbox_id: str) -> int:
    """The host pid of the sandbox's agent, found among its own cgroup's processes."""
    procs = (_memory_cgroup(controller, sandbox_id) / "cgroup.procs").read_text().split()
    for pid in map(int, procs):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"/usr/lib/coppice/agent.py" in cmdline:
            return pid
    raise AssertionError(f"no agent among the processes of {sandbox_id}: {procs}")


def _dead_answer(gw: GatewayProcess, sandbox_id: str) -> dict[str, object] | None:
    answer = httpx.get(f"{gw.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": API_KEY})
    if answer.status_code != 404:
        return None
    body: dict[str, object] = answer.json()
    return body if "reason" in body else None


def _scrape(gw: GatewayProcess, key: str = API_KEY) -> dict[str, dict[tuple[str, ...], float]]:
    """Every sample, as {family: {(sample name, label=value, ...): value}}."""
    answer = httpx.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(answer.text):
        for s in family.samples:
            key_of = (s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items())))
            found.setdefault(family.name, {})[key_of] = s.value
    return found


def test_an_agent_taken_by_the_oom_killer_is_reported_with_why(
    python_gateway: GatewayProcess, controller: PoolController, template: TemplateRecord
) -> None:
    sbx = Sandbox.create(template.name, timeout=120)
    sandbox_id = sbx.sandbox_id
    running = sbx.commands.run("sleep 60", background=True)
    assert sbx.commands.run("echo up").stdout == "up\n"
    # Make the agent the OOM killer's first choice, then fill the sandbox's memory cgroup
    # with a host process of the test's own that joins it and allocates past its limit.
    Path(f"/proc/{_agent_pid(controller, sandbox_id)}/oom_score_adj").write_text("1000\n")
    procs = _memory_cgroup(controller, sandbox_id) / "cgroup.procs"
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(procs)])
    try:
        hog.wait(timeout=60)
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()
    assert hog.returncode == -signal.SIGKILL  # the OOM killer took the hog too, in the end
    # The command in flight when the agent was taken ends saying why.
    with pytest.raises(SandboxException, match="out of memory"):
        running.wait()

    assert wait_for(lambda: _dead_answer(python_gateway, sandbox_id) is not None)
    body = _dead_answer(python_gateway, sandbox_id)
    assert body is not None
    assert (body["state"], body["reason"]) == ("killed", "out_of_memory")
    message = str(body["message"])
    assert message.startswith(f"sandbox {sandbox_id} was not found: it died at ")
    assert "out of memory: the kernel's OOM killer ended" in message

    # The SDK: in-sandbox calls carry the reason in their exception's text...
    with pytest.raises(SandboxException, match="out of memory") as info:
        sbx.commands.run("true")
    assert "was not found" in str(info.value)
    with pytest.raises(SandboxException, match="out of memory"):
        sbx.files.read("/etc/hostname")
    assert sbx.is_running() is False
    # ...while the REST calls keep E2B's types (the SDK drops a 404's message there).
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandbox_id)
    assert Sandbox.kill(sandbox_id) is False

    metrics = _scrape(python_gateway)
    deaths = metrics["coppice_sandbox_deaths"]
    died = ("coppice_sandbox_deaths_total", "reason=out_of_memory", f"template={template.name}")
    assert deaths[died] == 1
    kills = metrics["coppice_oom_kills"][("coppice_oom_kills_total", f"template={template.name}")]
    assert kills >= 1  # the agent (the hog may be taken after the death is recorded)
    assert "died, found by" in python_gateway.tail(200)  # and it was logged


def test_a_crashed_agent_is_reported_with_how_it_ended(
    python_gateway: GatewayProcess, controller: PoolController, template: TemplateRecord
) -> None:
    sbx = Sandbox.create(template.name, timeout=120)
    running = sbx.commands.run("sleep 60", background=True)
    assert sbx.commands.run("echo up").stdout == "up\n"
    os.kill(_agent_pid(controller, sbx.sandbox_id), signal.SIGKILL)
    # The jail's init is its agent: bwrap ends with it, reporting 128 + the signal. The
    # command in flight hears why from the stream's end, not as a dropped connection.
    with pytest.raises(SandboxException, match=r"killed by signal 9 \(SIGKILL\)") as info:
        running.wait()
    assert "was not found: it died at" in str(info.value)
    assert wait_for(lambda: _dead_answer(python_gateway, sbx.sandbox_id) is not None)
    with pytest.raises(SandboxException, match=r"killed by signal 9 \(SIGKILL\)"):
        sbx.commands.run("true")
    body = _dead_answer(python_gateway, sbx.sandbox_id)
    assert body is not None and body["reason"] == "crashed"
    assert "its init ended with status 137" in str(body["detail"])


def test_metrics_scraped_from_the_real_gateway(
    python_gateway: GatewayProcess, template: TemplateRecord
) -> None:
    forbidden = httpx.get(f"{python_gateway.url}/metrics", headers={"X-API-Key": OTHER_TENANT_KEY})
    assert forbidden.status_code == 403
    before = _scrape(python_gateway)
    sbx = Sandbox.create(template.name)
    try:
        assert sbx.commands.run("true").exit_code == 0
        after = _scrape(python_gateway)
    finally:
        sbx.kill()
    t = f"template={template.name}"

    def count(metrics: dict[str, dict[tuple[str, ...], float]], family: str, name: str) -> float:
        return metrics.get(family, {}).get((name, t), 0.0)

    def handed_out(metrics: dict[str, dict[tuple[str, ...], float]]) -> float:
        warm = count(metrics, "coppice_checkouts", "coppice_checkouts_total")
        return warm + count(metrics, "coppice_cold_starts", "coppice_cold_starts_total")

    creates = ("coppice_create_seconds", "coppice_create_seconds_count")
    assert handed_out(after) == handed_out(before) + 1
    assert count(after, *creates) == count(before, *creates) + 1
    # At least its configured size: the creates of the tests before may have grown it.
    assert after["coppice_pool_target"][("coppice_pool_target", t)] >= POOL
    reasons = [k for k in after["coppice_pool_target_reason"] if t in k]
    assert len(reasons) == 1, reasons
    assert after["coppice_sandboxes"][("coppice_sandboxes", "state=in_use", t)] >= 1
    assert ("coppice_pool_size", t) in after["coppice_pool_size"]
    buckets = [k for k in after["coppice_checkout_seconds"] if k[0].endswith("_bucket")]
    assert buckets, "the checkout histogram has its buckets"
