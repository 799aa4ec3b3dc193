"""The instance's lxcfs: a FUSE filesystem whose /proc files answer every reader with the
limits and usage of the reader's own cgroups. A jail shows them over its /proc, so `free`,
`top`, `uptime` and `os.cpu_count()` inside see the sandbox's memory limit, CPUs and load,
not the host's.

Coppice owns the daemon (no init system manages it on these hosts): one per instance,
mounted at <run_dir>/lxcfs, started by `prepare_host` (and again by any spawn that finds it
dead), stopped by `teardown_host`. It runs in a session of its own, re-parented away from
whoever started it, so a gateway that stops leaves it serving the jails that still run and
the next gateway finds it through its pidfile.

A jail bind-mounts the files when it starts, so a daemon restarted after a crash serves the
jails started after it; those started before keep files that answer ENOTCONN until they are
replaced.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from coppice.errors import SubstrateError
from coppice.host import mounts
from coppice.host.processes import ProcessIdentity

LXCFS = "lxcfs"
#: the files lxcfs answers per cgroup that a jail shows over its own /proc. (diskstats needs
#: the blkio controller, which jails do not join; slabinfo is the host root's alone.)
PROC_FILES = ("cpuinfo", "meminfo", "stat", "uptime", "loadavg", "swaps")
#: lxcfs's own runtime directory: the mount points of its private mount namespace, shared
#: by every lxcfs on the host, compiled in
RUNTIME_DIR = Path("/run/lxcfs")
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
#: CPU counts from the CFS quota as well as the cpuset, and a load average per cgroup
OPTIONS = ("--enable-cfs", "--enable-loadavg")


class MountState(enum.Enum):
    ABSENT = "nothing mounted"
    LIVE = "mounted and answering"
    DEAD = "mounted, its daemon gone"


class Repair(enum.Enum):
    STOP = "stop the daemon"
    DETACH = "detach the dead mount"
    START = "start a daemon"


def repair_plan(daemon_running: bool, mount: MountState) -> tuple[Repair, ...]:
    """What brings the instance's lxcfs to serving, from what is found. A live mount is left
    alone, whoever serves it: unmounting it would break every jail bound to it."""
    if mount is MountState.LIVE:
        return ()
    steps: list[Repair] = []
    if daemon_running:
        steps.append(Repair.STOP)  # running without a working mount: it serves nobody
    if mount is MountState.DEAD:
        steps.append(Repair.DETACH)
    steps.append(Repair.START)
    return tuple(steps)


def proc_binds(mountpoint: Path) -> list[str]:
    """bwrap options that show lxcfs's files over a jail's /proc; they must come after the
    jail's --proc."""
    argv: list[str] = []
    for name in PROC_FILES:
        argv += ["--ro-bind", str(mountpoint / "proc" / name), f"/proc/{name}"]
    return argv


class LxcfsDaemon:
    def __init__(self, run_dir: Path) -> None:
        self.mountpoint = run_dir / "lxcfs"
        self.pidfile = run_dir / "lxcfs.pid"
        self.log = run_dir / "lxcfs.log"
        self._lock_path = run_dir / "lxcfs.lock"

    # -- what is there --------------------------------------------------------------------

    def daemon_pid(self) -> int | None:
        """The pid of the running lxcfs serving this instance's mount point, if any."""
        try:
            pid = int(self.pidfile.read_text().strip())
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        ident = ProcessIdentity.of(pid)
        if ident is None or not ident.is_running():
            return None
        if str(self.mountpoint).encode() not in args:
            return None  # the pid was reused by another process
        return pid

    def mount_state(self) -> MountState:
        if mounts.filesystem_at(self.mountpoint) != "fuse.lxcfs":
            return MountState.ABSENT
        try:
            # statfs always asks the daemon; a stat may be answered from the attribute cache
            # for a while after it died.
            os.statvfs(self.mountpoint)
        except OSError:
            return MountState.DEAD  # ENOTCONN: the daemon behind it is gone
        return MountState.LIVE

    # -- bringing it up and down ----------------------------------------------------------

    def ensure(self) -> None:
        """Serving when this returns: found running, or repaired and started."""
        with self._locked():
            for step in repair_plan(self.daemon_pid() is not None, self.mount_state()):
                if step is Repair.STOP:
                    self._stop_daemon()
                elif step is Repair.DETACH:
                    self._detach()
                else:
                    self._start()

    def stop(self) -> None:
        """Stop the daemon, unmount, and remove what it kept in the run directory."""
        with self._locked():
            self._stop_daemon()
            if mounts.filesystem_at(self.mountpoint) is not None:
                self._detach()
            for path in (self.pidfile, self.log):
                path.unlink(missing_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.mountpoint.rmdir()
        self._lock_path.unlink(missing_ok=True)
        _remove_runtime_dir_if_unused()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One bring-up at a time across threads and processes (a CLI beside a gateway)."""
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.pidfile.unlink(missing_ok=True)
        argv = [LXCFS, *OPTIONS, "--pidfile", str(self.pidfile), str(self.mountpoint)]
        with open(self.log, "ab") as log:
            # setsid --fork: the daemon is nobody's child here, so it outlives this process
            # and is never left a zombie of it.
            subprocess.run(
                ["setsid", "--fork", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",
                check=False,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.005
        while self.mount_state() is not MountState.LIVE:
            if time.monotonic() > deadline:
                raise SubstrateError(
                    f"lxcfs did not mount {self.mountpoint} within {START_TIMEOUT_S:.0f} s "
                    f"({self._log_tail()}); check that /dev/fuse exists (modprobe fuse) and "
                    "that `lxcfs` runs by hand"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _stop_daemon(self) -> None:
        pid = self.daemon_pid()
        if pid is None:
            return
        ident = ProcessIdentity.of(pid)
        # SIGTERM: lxcfs unmounts on its way out.
        for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while ident is not None and ident.is_running() and time.monotonic() < deadline:
                time.sleep(0.01)
            if ident is None or not ident.is_running():
                return
        raise SubstrateError(f"lxcfs (pid {pid}) did not exit after SIGKILL; kill it by hand")

    def _detach(self) -> None:
        try:
            mounts.unmount(self.mountpoint)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise SubstrateError(f"cannot unmount the dead lxcfs: {exc}") from exc

    def _log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "its log is empty"


def _remove_runtime_dir_if_unused() -> None:
    """lxcfs makes RUNTIME_DIR and never removes it. Removing one of its directories while
    any lxcfs runs would detach that daemon's mounts from its private namespace, so it goes
    only once no lxcfs is left on the host."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            raw = stat.read_text()
            name = raw[raw.index("(") + 1 : raw.rindex(")")]
            state = raw[raw.rindex(")") + 2]
            if name == LXCFS and state not in "ZX":  # one that exited is no user
                return
    for d in (RUNTIME_DIR / "controllers", RUNTIME_DIR / "root", RUNTIME_DIR):
        with contextlib.suppress(OSError):
            d.rmdir()
