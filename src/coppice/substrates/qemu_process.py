"""Starting, finding and stopping QEMU processes of the `vm` substrate.

A QEMU process is found again (after a restart of Coppice, or when its pool entry never got
a handle) by the per-VM directory on its command line: every socket and file it uses lives
in that directory, so its path names the VM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from coppice.errors import SubstrateError
from coppice.host.processes import ProcessIdentity

#: the niceness a VM warms at, and serves at once handed out: a refill's vCPUs yield to the
#: sandboxes in use (the jail's cgroup CPU weights do the same for jails)
WARMING_NICE, SERVING_NICE = 10, 0


def launch(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start QEMU at WARMING_NICE (`nice` execs it: the pid is QEMU's)."""
    with open(log_path, "ab") as log:
        try:
            return subprocess.Popen(
                ["nice", "-n", str(WARMING_NICE), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise SubstrateError(f"cannot start {argv[0]}: {exc}") from exc


def serve_at_full_priority(pid: int) -> None:
    """Every thread of the QEMU process to SERVING_NICE (niceness is per thread on Linux,
    and vCPU threads took the warming value when they were made)."""
    try:
        threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return  # gone: the resume that follows reports it
    for tid in threads:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, SERVING_NICE)


def processes_under(directory: Path) -> dict[int, tuple[ProcessIdentity, str]]:
    """QEMU processes whose command line names a path inside `directory`: by pid, their
    identity and the name of the directory's child they use (a VM's own directory)."""
    marker = str(directory).rstrip("/") + "/"
    found: dict[int, tuple[ProcessIdentity, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "qemu-system" not in argv[0]:
            continue
        text = "\0".join(argv)
        at = text.find(marker)
        if at < 0:
            continue
        name = text[at + len(marker) :].split("/", 1)[0].split("\0", 1)[0]
        ident = ProcessIdentity.of(int(entry.name))
        if ident is not None:
            found[ident.pid] = (ident, name)
    return found


def kill_and_wait(
    ident: ProcessIdentity, child: subprocess.Popen[bytes] | None, timeout_s: float = 10.0
) -> None:
    """SIGKILL the process if it is still the one named, and wait until it is gone.

    QEMU holds nothing worth flushing here (the template disk is read-only, the writable
    disk is deleted with its VM, RAM is a private mapping), so there is no reason to ask it
    to quit politely.
    """
    if ident.is_running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(ident.pid, signal.SIGKILL)
    if child is not None:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise SubstrateError(f"qemu {ident.pid} did not exit after SIGKILL") from exc
        return
    deadline = time.monotonic() + timeout_s
    while ident.is_running():
        if time.monotonic() > deadline:
            raise SubstrateError(f"qemu {ident.pid} did not exit after SIGKILL")
        time.sleep(0.01)


def cpu_ticks(pid: int) -> int | None:
    """User plus system CPU time of a process, in clock ticks."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def wait_until_idle(
    pid: int, timeout_s: float, window_s: float = 0.1, max_busy: float = 0.15
) -> bool:
    """Block until the process spends at most `max_busy` of a window on the CPU.

    A guest that has just answered its readiness probes is still busy for a while (sshd's
    child for the probe connection, the agent's bookkeeping). Pausing it then means the
    first request after resume waits behind that work; under TCG that is tens of ms.
    Returns False when the guest did not settle within the timeout.
    """
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout_s
    before = cpu_ticks(pid)
    while before is not None:
        time.sleep(window_s)
        after = cpu_ticks(pid)
        if after is None:
            return False
        if (after - before) * tick <= max_busy * window_s:
            return True
        if time.monotonic() > deadline:
            return False
        before = after
    return False
