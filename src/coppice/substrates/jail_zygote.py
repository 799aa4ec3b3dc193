"""Template zygotes for the jail substrate: per template version, one process that has done
the agent's imports once and forks each new entry's processes (coppice_agent.zygote), so
warming an entry costs a fork and its namespaces instead of a fresh interpreter.

A zygote is confined like a jail: root of a user namespace mapped to the jail id range
(unshare + newuidmap), bwrap over the template's rootfs read-only, its own mount, pid, ipc,
uts, network and cgroup namespaces, no host path, an empty environment, CAP_SETUID,
CAP_SETGID and CAP_SETFCAP alone (to map its forks' user namespaces) and a seccomp filter
that denies what the jail's does except making namespaces and mounts, which its forks need
(each then loads the jail's own filter on top). It never holds anything of an entry: the
host sends each fork's descriptors, the fork closes every other one.

The host talks to it over a SOCK_SEQPACKET socketpair. Per entry it sends a detached copy
of the entry's overlay (open_tree), lxcfs's /proc files likewise, the cgroup.procs files to
join, the console log, the seccomp program and one end of a fresh report socket. The fork's
PID 1 reports on that socket (its host pid rides along as SCM_CREDENTIALS), the host
attaches the entry's network namespace (a bind of /proc/<pid>/ns/net at /run/netns/<name>)
and configures its veth as for any jail, then answers "go".

A zygote whose host socket closes (the host is stopping it, or the process that started it
is gone) stops forking and ends once the last entry in its pid namespace has ended: those
entries would die with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coppice.errors import SubstrateError
from coppice.host import detached_mounts
from coppice.substrates import zygote_wire

log = logging.getLogger(__name__)

ZYGOTE_SCRIPT = "/usr/lib/coppice/zygote.py"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
#: after a zygote failed to start, spawns of its template use bwrap this long before the
#: next try (a broken template would otherwise pay a failed start per entry)
RETRY_AFTER_S = 300.0
#: the zygote's capabilities in its user namespace: writing its forks' uid and gid maps
#: (mapping a fork's root to the zygote's own uid also takes CAP_SETFCAP, since Linux 5.12)
ZYGOTE_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID", "CAP_SETFCAP")
# Host root, before the zygote's namespaces: -1000 (and its min, see jail.LAUNCHER) is
# inherited by every fork, so the entries' init, sshd and agent start as they would in a
# bwrap jail.
ZYGOTE_LAUNCHER = 'echo -1000 2>/dev/null > /proc/self/oom_score_adj; exec "$@"'


@dataclass(frozen=True)
class TemplateVersion:
    """What a zygote was started from: a rebuilt template gets a zygote of its own."""

    name: str
    rootfs: str
    built_at: float


@dataclass(frozen=True)
class EntryDescriptors:
    """What one fork is sent, by role (see coppice_agent.zygote.plan.EntryRequest)."""

    root: int
    console: int
    seccomp: int
    cgroups: Sequence[int]
    proc_files: dict[str, int]

    def roles_and_fds(self) -> tuple[list[str], list[int]]:
        roles = ["root", "console", "seccomp"] + ["cgroup"] * len(self.cgroups)
        fds = [self.root, self.console, self.seccomp, *self.cgroups]
        for name, fd in sorted(self.proc_files.items()):
            roles.append(f"proc:{name}")
            fds.append(fd)
        return roles, fds

    def close(self) -> None:
        for fd in self.roles_and_fds()[1]:
            with contextlib.suppress(OSError):
                os.close(fd)


def open_descriptors(
    root: Path,
    console: Path,
    seccomp: Path,
    cgroup_files: Sequence[Path],
    proc_files: dict[str, Path],
) -> EntryDescriptors:
    """Open everything a fork is sent; on failure nothing stays open."""
    opened: list[int] = []

    def keep(fd: int) -> int:
        opened.append(fd)
        return fd

    try:
        nosuid = detached_mounts.MOUNT_ATTR_NOSUID | detached_mounts.MOUNT_ATTR_NODEV
        return EntryDescriptors(
            root=keep(detached_mounts.clone_tree(root, nosuid)),
            console=keep(
                os.open(console, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            ),
            seccomp=keep(os.open(seccomp, os.O_RDONLY | os.O_CLOEXEC)),
            cgroups=[keep(os.open(p, os.O_WRONLY | os.O_CLOEXEC)) for p in cgroup_files],
            proc_files={
                name: keep(
                    detached_mounts.clone_tree(path, nosuid | detached_mounts.MOUNT_ATTR_RDONLY)
                )
                for name, path in proc_files.items()
            },
        )
    except OSError:
        for fd in opened:
            os.close(fd)
        raise


class Zygote:
    """One running zygote process and the host's end of its socket."""

    def __init__(
        self, version: TemplateVersion, proc: subprocess.Popen[bytes], control: socket.socket
    ) -> None:
        self.version = version
        self.proc = proc
        self._control = control
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @classmethod
    def start(
        cls,
        version: TemplateVersion,
        argv_for: Callable[[int, int], list[str]],
        seccomp: Path,
        log_path: Path,
    ) -> Zygote:
        """Start a zygote and wait until it has done its imports. `argv_for(control_fd,
        seccomp_fd)`: the command line."""
        host_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        filter_fd = os.open(seccomp, os.O_RDONLY)
        try:
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    argv_for(zygote_end.fileno(), filter_fd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    pass_fds=(zygote_end.fileno(), filter_fd),
                    start_new_session=True,
                )
        finally:
            os.close(filter_fd)
            zygote_end.close()
        zygote = cls(version, proc, host_end)
        try:
            hello = zygote_wire.receive(host_end, START_TIMEOUT_S)
        except (TimeoutError, OSError, zygote_wire.ZygoteWireError) as exc:
            zygote.stop()
            raise SubstrateError(f"the zygote of {version.name} did not start: {exc}") from exc
        if hello is None or not hello.body.get("ready"):
            zygote.stop()
            raise SubstrateError(
                f"the zygote of {version.name} ended before it was ready (see {log_path})"
            )
        return zygote

    def fork_entry(
        self,
        entry_id: str,
        hostname: str,
        shm_bytes: int,
        run_bytes: int,
        capabilities: Sequence[str],
        uid_count: int,
        descriptors: EntryDescriptors,
        attach: Callable[[int], None],
        timeout_s: float,
    ) -> int:
        """Fork the entry and return its PID 1's host pid, once `attach(pid)` (the host's
        network set-up) has run and the entry has been told to start. The descriptors are
        closed here, whatever happens."""
        host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            host_end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            roles, fds = descriptors.roles_and_fds()
            body = {
                "op": "entry",
                "entry_id": entry_id,
                "hostname": hostname,
                "shm_bytes": shm_bytes,
                "run_bytes": run_bytes,
                "capabilities": list(capabilities),
                "uid_count": uid_count,
                "fds": [*roles, "report"],
            }
            try:
                with self._lock:
                    zygote_wire.send(self._control, body, [*fds, child_end.fileno()])
            except OSError as exc:
                raise SubstrateError(f"the zygote of {self.version.name} is gone: {exc}") from exc
        finally:
            descriptors.close()
            child_end.close()
        with host_end:
            try:
                report = zygote_wire.receive(host_end, timeout_s)
            except (TimeoutError, OSError, zygote_wire.ZygoteWireError) as exc:
                raise SubstrateError(
                    f"entry {entry_id} did not start from its zygote: {exc}"
                ) from exc
            if report is None:
                raise SubstrateError(f"entry {entry_id} ended before it started (see its console)")
            if "error" in report.body or report.sender_pid is None:
                raise SubstrateError(f"entry {entry_id} did not start: {report.body.get('error')}")
            pid = report.sender_pid
            attach(pid)
            zygote_wire.send(host_end, {"go": True})
        return pid

    def stop(self) -> None:
        """Close its socket: it forks no more and ends once its last entry has; called when
        none is left (teardown), or when it is being replaced."""
        self._control.close()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)


class TemplateZygotes:
    """The zygotes of one substrate instance, one per template version, each started on
    first use and again if it died."""

    def __init__(self, start: Callable[[TemplateVersion], Zygote]) -> None:
        self._start = start
        self._by_version: dict[TemplateVersion, Zygote] = {}
        self._failed: dict[TemplateVersion, float] = {}
        self._lock = threading.Lock()

    def get(self, version: TemplateVersion) -> Zygote | None:
        """The running zygote of `version`, started if need be; None when it cannot start
        (the caller falls back to starting the jail with bwrap)."""
        with self._lock:
            zygote = self._by_version.get(version)
            if zygote is not None and zygote.alive():
                return zygote
            if zygote is not None:
                log.warning(
                    "the zygote of %s (pid %d) died; starting another", version.name, zygote.pid
                )
                self._by_version.pop(version)
            failed_at = self._failed.get(version)
            if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_S:
                return None
            # Older versions of the template get no new entries; theirs end on their own.
            for old in [v for v in self._by_version if v.name == version.name]:
                self._by_version.pop(old)._control.close()
            try:
                zygote = self._start(version)
            except SubstrateError as exc:
                log.warning("%s; its entries start without a zygote", exc)
                self._failed[version] = time.monotonic()
                return None
            self._failed.pop(version, None)
            self._by_version[version] = zygote
            return zygote

    def stop_all(self) -> None:
        with self._lock:
            zygotes = list(self._by_version.values())
            self._by_version.clear()
            self._failed.clear()
        for zygote in zygotes:
            zygote.stop()
