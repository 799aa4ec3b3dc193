"""Resources as a sandbox sees them (its own memory, CPUs, uptime, load, disk and init), and
memory kills that spare the agent: through the real e2b SDKs on jails, over SSH on a vm
clone."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from e2b import CommandExitException, Sandbox, SandboxException
from e2b_code_interpreter import Sandbox as CodeSandbox

from coppice.config import Limits
from coppice.images.keys import PoolKey
from coppice.pool.controller import PoolController
from coppice.smoke import ssh_command
from coppice.substrates.base import AGENT_PORT
from coppice.substrates.cpu_placement import cpus_wanted, parse_cpu_list
from coppice.substrates.readiness import agent_health
from tests.waiting import wait_until

from .gateway_process import GatewayProcess

pytestmark = pytest.mark.integration

MIB = 1 << 20
# What every zero-filled chunk costs: each page is touched, so the memory is really used,
# as a program filling a list or a DataFrame would use it.
GRADUAL_FILL = "python3 -c 'chunks = []\nwhile True: chunks.append(bytearray(16 << 20))'"
# What the agent's processes have (the jail's init chain): -1000 where host root holds
# CAP_SYS_RESOURCE, 0 where it does not (see jail.py); never what user processes get.
CHAIN_VALUES = {"-1000", "0"}


def _limits(controller: PoolController, template: str) -> Limits:
    return controller.store.get_template(template).policy.limits or controller.settings.limits


def _meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        found[key] = int(value.split()[0]) * 1024
    return found


def _agent_pid(sbx: Sandbox) -> str:
    return sbx.commands.run("pgrep -o -f /usr/lib/coppice/agent.py").stdout.strip()


# -- what `free`, `nproc`, `uptime`, `df` and /proc/1 show ------------------------------------


def test_free_and_meminfo_show_the_memory_limit(
    gateway: GatewayProcess, controller: PoolController
) -> None:
    limit = _limits(controller, "base").memory_mb * MIB
    sbx = Sandbox.create()
    try:
        free = sbx.commands.run("free -b").stdout.splitlines()
        mem = free[1].split()
        assert mem[0] == "Mem:" and int(mem[1]) == limit, free
        meminfo = _meminfo(sbx.files.read("/proc/meminfo"))
        assert meminfo["MemTotal"] == limit
        assert 0 < meminfo["MemAvailable"] <= limit
        # What is used is the sandbox's own: 200 MiB held shows as 200 MiB more in use.
        before = meminfo["MemTotal"] - meminfo["MemFree"]
        held = sbx.commands.run(
            'python3 -c "import re; x = bytearray(200 << 20); '
            "m = dict(re.findall(r'(\\w+):\\s+(\\d+)', open('/proc/meminfo').read())); "
            "print(int(m['MemTotal']) - int(m['MemFree']))\""
        )
        assert int(held.stdout) * 1024 >= before + 190 * MIB
    finally:
        sbx.kill()


def test_nproc_and_the_cpu_files_show_the_cpu_limit(
    gateway: GatewayProcess, controller: PoolController
) -> None:
    want = cpus_wanted(_limits(controller, "base").cpus, len(os.sched_getaffinity(0)))
    sbx = Sandbox.create()
    try:
        assert sbx.commands.run("nproc").stdout.strip() == str(want)
        counts = sbx.commands.run(
            "python3 -c 'import os; print(os.cpu_count(), len(os.sched_getaffinity(0)))'"
        ).stdout.split()
        assert counts == [str(want), str(want)]
        assert sbx.commands.run("grep -c ^processor /proc/cpuinfo").stdout.strip() == str(want)
        stat = sbx.files.read("/proc/stat")
        assert len(re.findall(r"^cpu\d+ ", stat, re.MULTILINE)) == want
        # The host side: the sandbox's cpuset holds that many of the host's CPUs.
        entry = controller.store.get(sbx.sandbox_id)
        cpuset = Path(f"/sys/fs/cgroup/cpuset/{controller.settings.namespace}/{entry.id}")
        if cpuset.is_dir():
            assert len(parse_cpu_list((cpuset / "cpuset.cpus").read_text())) == want
    finally:
        sbx.kill()


def test_uptime_and_load_are_the_sandboxs(gateway: GatewayProcess) -> None:
    host_uptime = float(Path("/proc/uptime").read_text().split()[0])
    host_tasks = int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])
    sbx = Sandbox.create()
    try:
        # Since the sandbox's init started (when its pool entry was warmed), not the host's boot.
        seen = float(sbx.files.read("/proc/uptime").split()[0])
        assert 0 <= seen < host_uptime - 1
        assert "load average" in sbx.commands.run("uptime").stdout
        loadavg = sbx.files.read("/proc/loadavg").split()
        assert len(loadavg) == 5
        running, total = (int(n) for n in loadavg[3].split("/"))
        assert 0 <= running <= total < host_tasks
    finally:
        sbx.kill()


def test_df_shows_the_sandboxs_disk(gateway: GatewayProcess, controller: PoolController) -> None:
    disk = _limits(controller, "base").disk_mb * MIB
    sbx = Sandbox.create()
    try:
        size = int(sbx.commands.run("df -B1 --output=size / | tail -1").stdout)
        assert 0.9 * disk <= size <= 1.1 * disk
    finally:
        sbx.kill()


def test_proc_1_is_the_sandboxs_init_without_host_paths(
    gateway: GatewayProcess, controller: PoolController
) -> None:
    sbx = Sandbox.create()
    try:
        cmdline = sbx.files.read("/proc/1/cmdline", format="bytes")
        assert cmdline.split(b"\0")[:2] == [b"/bin/sh", b"/usr/lib/coppice/init"]
        environ = sbx.commands.run("tr '\\0' '\\n' < /proc/1/environ", user="root").stdout
        host_paths = [
            str(controller.settings.run_dir),
            str(controller.settings.state_dir),
            "/var/tmp",
            "bwrap",
        ]
        for shown in (cmdline.decode(), environ):
            for path in host_paths:
                assert path not in shown
        assert sbx.commands.run("readlink /proc/1/cwd", user="root").stdout.strip() == "/root"
        assert sbx.commands.run("ps -o comm= -p 1").stdout.strip() == "init"
    finally:
        sbx.kill()


def test_init_reaps_orphans(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create()
    try:
        # The subshell exits at once, its sleep is re-parented to PID 1 and exits later.
        sbx.commands.run("(sleep 0.2 &) ; sleep 1")
        zombies = sbx.commands.run("ps -eo stat= | grep -c ^Z || true").stdout.strip()
        assert zombies == "0"
    finally:
        sbx.kill()


def test_init_passes_a_stop_signal_on_and_the_sandbox_ends(
    gateway: GatewayProcess, controller: PoolController
) -> None:
    sbx = Sandbox.create()
    entry = controller.store.get(sbx.sandbox_id)
    assert entry.pid is not None and entry.handle is not None
    if "zygote" in entry.handle.driver:
        init = entry.pid  # a zygote's fork: the head is the jail's PID 1 itself
    else:
        # The head is bwrap's monitor on the host; its one child is the jail's PID 1.
        children = Path(f"/proc/{entry.pid}/task/{entry.pid}/children").read_text().split()
        assert len(children) == 1
        init = int(children[0])
    assert Path(f"/proc/{init}/cmdline").read_bytes().startswith(b"/bin/sh\0/usr/lib/coppice/init")
    # PID 1 of a namespace gets only the signals it handles: a TERM reaches the agent only
    # because init traps it and sends it on; the agent stops, and init and the jail with it.
    os.kill(init, signal.SIGTERM)
    assert wait_until(lambda: not Path(f"/proc/{init}").exists(), timeout=30)
    with pytest.raises(SandboxException, match=r"not running|not found"):
        sbx.commands.run("true")
    Sandbox.kill(sbx.sandbox_id)


# -- memory kills that spare the agent ------------------------------------------------------


def test_a_huge_allocation_fails_and_the_sandbox_answers(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create()
    try:
        agent = _agent_pid(sbx)
        with pytest.raises(CommandExitException) as info:
            sbx.commands.run('python3 -c "bytearray(64 << 30)"')
        assert info.value.exit_code != 0
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        assert _agent_pid(sbx) == agent
    finally:
        sbx.kill()


def test_filling_memory_kills_the_command_not_the_agent(gateway: GatewayProcess) -> None:
    sbx = Sandbox.create()
    try:
        agent = _agent_pid(sbx)
        background = sbx.commands.run("sleep 600", background=True)
        with pytest.raises(CommandExitException) as info:
            sbx.commands.run(GRADUAL_FILL, timeout=120)
        # SIGKILLed by the OOM killer: the process's own signal, or bash's 128 + 9.
        assert info.value.exit_code in (-1, 137), info.value
        assert info.value.exit_code == 137 or "killed" in (info.value.error or "")
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        assert _agent_pid(sbx) == agent
        # Only the process that filled the memory went: the rest of the sandbox is as it was.
        assert background.pid in [p.pid for p in sbx.commands.list()]
    finally:
        sbx.kill()


def test_oom_scores_spare_the_agent_init_and_sshd(
    gateway: GatewayProcess, controller: PoolController
) -> None:
    sbx = Sandbox.create()
    try:
        probe = (
            "for p in 1 $(pgrep -o -f /usr/lib/coppice/agent.py) $(pgrep -o -x sshd); do "
            "cat /proc/$p/oom_score_adj; done; cat /proc/self/oom_score_adj"
        )
        init, agent, sshd, user = sbx.commands.run(probe, user="root").stdout.split()
        assert init == agent == sshd and agent in CHAIN_VALUES
        assert user == "1000"
        # A command run through sudo (the agent's broker starts it) is a user's too.
        assert sbx.commands.run("sudo cat /proc/self/oom_score_adj").stdout.strip() == "1000"
        # A session through sshd is a user's too (the pool key logs in as root).
        entry = controller.store.get(sbx.sandbox_id)
        key = PoolKey.at(controller.settings.keys_dir)
        assert ssh_command(key, entry.ip, "cat /proc/self/oom_score_adj").strip() == "1000"
    finally:
        sbx.kill()


def test_filling_memory_in_a_cell_restarts_the_kernel(gateway: GatewayProcess) -> None:
    ci = CodeSandbox.create()
    try:
        assert ci.run_code("kept = 1\nkept").text == "1"
        agent = ci.commands.run("pgrep -o -f /usr/lib/coppice/agent.py").stdout.strip()
        ex = ci.run_code("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))")
        assert ex.error is not None and ex.error.name == "DeadKernelError", ex
        # The next cell runs, on a fresh kernel (the old one's state is gone).
        assert ci.run_code("1 + 1").text == "2"
        assert ci.run_code("'kept' in dir()").text == "False"
        assert ci.commands.run("pgrep -o -f /usr/lib/coppice/agent.py").stdout.strip() == agent
    finally:
        ci.kill()


# -- the vm substrate -----------------------------------------------------------------------


@pytest.mark.slow
def test_filling_memory_in_a_vm_kills_the_command_not_the_agent(
    vm_pool: PoolController,
) -> None:
    pool = vm_pool
    assert not pool.warm("python-vm", 1).failures
    entry = pool.checkout("python-vm")
    key = PoolKey.at(pool.settings.keys_dir)

    def ssh(command: str) -> str:
        return ssh_command(key, entry.ip, command, timeout_s=300)

    agent = ssh("pgrep -o -f /usr/lib/coppice/agent.py").strip()
    scores = ssh(
        f"cat /proc/{agent}/oom_score_adj /proc/$(pgrep -o -x sshd)/oom_score_adj "
        "/proc/self/oom_score_adj"
    ).split()
    # In a VM, init is real root: the agent and sshd are never picked.
    assert scores == ["-1000", "-1000", "1000"]
    out = ssh(f"{GRADUAL_FILL}; echo status=$?")
    assert out.strip().endswith("status=137"), out
    assert agent_health(entry.ip, AGENT_PORT, timeout_s=10) == 204
    assert ssh("pgrep -o -f /usr/lib/coppice/agent.py").strip() == agent
