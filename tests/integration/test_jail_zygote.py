"""Jail entries forked from their template's zygote: confined as a bwrap-started jail, each
with nothing of the one before it, and gone without a trace when killed."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from coppice.images.keys import PoolKey
from coppice.pool.controller import PoolController
from coppice.smoke import ssh_command
from coppice.store.records import EntryRecord
from coppice.substrates.jail import CAPABILITIES
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

INTERPRETER_PORT = 49999
CAP_NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5,
    "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10,
    "CAP_SYS_CHROOT": 18, "CAP_AUDIT_WRITE": 29,
}  # fmt: skip


def _ssh(pool: PoolController, ip: str, command: str) -> str:
    return ssh_command(PoolKey.at(pool.settings.keys_dir), ip, command)


def _run_code(ip: str, code: str) -> str:
    """What the default kernel prints and returns for `code` (the interpreter's stream)."""
    request = urllib.request.Request(
        f"http://{ip}:{INTERPRETER_PORT}/execute",
        data=json.dumps({"code": code}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        out = []
        for line in r.read().decode().splitlines():
            event = json.loads(line)
            if event.get("type") in ("stdout", "result", "error"):
                out.append(str(event.get("text") or event.get("value") or event))
        return "".join(out)


def _forked(pool: PoolController, count: int) -> list[EntryRecord]:
    report = pool.warm("python", count)
    assert not report.failures, report.failures
    entries = [pool.checkout("python") for _ in range(count)]
    for e in entries:
        assert e.handle is not None and "zygote" in e.handle.driver, "not a zygote fork"
    return entries


def test_a_forked_entry_is_confined_as_a_jail(pool: PoolController) -> None:
    assert pool.settings.jail_zygote
    (e,) = _forked(pool, 1)
    report = _ssh(
        pool,
        e.ip,
        "tr '\\0' ' ' < /proc/1/cmdline; echo; hostname; hostname -I; nproc;"
        " grep MemTotal /proc/meminfo; grep -E '^(CapBnd|Seccomp|NoNewPrivs):' /proc/self/status;"
        " cat /proc/self/uid_map; ps -o comm= -p 1; ls /proc | grep -cE '^[0-9]+$';"
        " cat /proc/self/mountinfo",
    )
    lines = report.splitlines()
    assert lines[0].strip() == "/bin/sh /usr/lib/coppice/init"
    assert lines[1] == e.hostname
    assert lines[2].split() == [e.ip]
    assert lines[3] == "1"  # the default 1.0 CPU, placed once ready
    assert int(lines[4].split()[1]) == pool.settings.limits.memory_mb * 1024
    status = dict(line.split(":\t") for line in lines[5:8])
    keep = sum(1 << CAP_NUMBERS[c] for c in CAPABILITIES)
    assert int(status["CapBnd"], 16) == keep
    assert status["Seccomp"] == "2"
    assert status["NoNewPrivs"] == "1"
    # its own user namespace, in the zygote's: seen from inside relative to that one
    assert lines[8].split() == ["0", "0", str(pool.settings.jail_uid_count)]
    assert e.pid is not None
    host_view = Path(f"/proc/{e.pid}/uid_map").read_text().split()
    assert host_view == ["0", str(pool.settings.jail_uid_base), str(pool.settings.jail_uid_count)]
    assert lines[9] == "init"
    # what is mounted where (an overlay's options name its layers, as in any jail)
    mounted = " ".join(" ".join(line.split()[3:5]) for line in lines[11:])
    for host_path in (pool.settings.run_dir, pool.settings.state_dir, "/var/tmp", "/tmp/root"):
        assert str(host_path) not in mounted
    # its own namespaces: none of them the zygote's
    zygote = int(e.handle.driver["zygote"]) if e.handle else 0
    assert e.pid is not None
    zygote_python = int(Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split()[0])
    for ns in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup"):
        mine = os.readlink(f"/proc/{e.pid}/ns/{ns}")
        assert mine != os.readlink(f"/proc/{zygote_python}/ns/{ns}"), ns
        assert mine != os.readlink(f"/proc/self/ns/{ns}"), ns
    # the default kernel came from the kernel zygote: in the sandbox, as its user
    out = _run_code(e.ip, "import os; print(os.getuid() != 0, os.getppid())")
    assert out.split()[:2] == ["True", "0"], out  # its parent is outside the sandbox


def test_nothing_of_one_sandbox_reaches_the_next(pool: PoolController) -> None:
    (a,) = _forked(pool, 1)
    _ssh(pool, a.ip, "echo secret > /tmp/left-behind; (setsid sleep 1000 >/dev/null 2>&1 &)")
    _run_code(a.ip, "import os; os.environ['LEFT_BEHIND'] = 'secret'; left_behind = 42")
    assert "42" in _run_code(a.ip, "print(left_behind)")
    pool.return_entry(a.id)
    (b,) = _forked(pool, 1)
    out = _ssh(
        pool,
        b.ip,
        "test -e /tmp/left-behind && echo file-seen; pgrep -f '[s]leep 1000' && echo process-seen;"
        " printenv LEFT_BEHIND; echo done",
    )
    assert out.strip() == "done", out
    kernel = _run_code(
        b.ip, "import os; print('left_behind' in globals(), os.environ.get('LEFT_BEHIND'))"
    )
    assert kernel.split() == ["False", "None"], kernel


def test_killed_and_reconciled_forks_leave_nothing(pool: PoolController) -> None:
    entries = _forked(pool, 2)
    victim = entries[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    assert wait_until(
        lambda: not pool.substrate("jail").is_alive(victim.id, victim.handle), timeout=10
    )
    pool.reconcile()
    jail = pool.substrate("jail")
    assert victim.id not in jail.host_objects().all_ids()
    pool.return_entry(entries[1].id)
    pool.reconcile()
    assert not (jail.host_objects().all_ids() & {e.id for e in entries})
