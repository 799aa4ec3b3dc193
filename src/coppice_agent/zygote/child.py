"""A forked entry becoming a jail: what runs in the zygote's fork (joining the entry's
cgroups, a user namespace of its own whose ids the zygote maps, then every other namespace)
and in its own fork, the entry's PID 1 (the root, pivot_root, capabilities, no_new_privs,
seccomp, the report to the host). Ends in the entry's init (`init.py`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from coppice_agent.zygote import linux, wire
from coppice_agent.zygote.plan import (
    Attach,
    Bind,
    Devpts,
    EntryRequest,
    MakeDir,
    MakeFile,
    Proc,
    RemountReadOnly,
    Step,
    Symlink,
    Tmpfs,
    capability_numbers,
    root_steps,
)

#: every namespace of the entry's own but the user namespace, which comes first (its ids
#: must be mapped before the others are made, so that they belong to it)
ENTRY_NAMESPACES = (
    linux.CLONE_NEWNS
    | linux.CLONE_NEWUTS
    | linux.CLONE_NEWIPC
    | linux.CLONE_NEWNET
    | linux.CLONE_NEWCGROUP
    | linux.CLONE_NEWPID
)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_UNPRIVILEGED_PORTS = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD)


def close_all_but(keep: set[int]) -> None:
    """Close every descriptor not in `keep`: a fork carries nothing of the zygote's (its
    control socket) or of another entry's."""
    lo = 0
    for fd in sorted(keep):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, os.sysconf("SC_OPEN_MAX"))


def become_entry(
    request: EntryRequest,
    ids_mapped: Callable[[], None],
    become_init: Callable[[EntryRequest], None],
    kernel_channel: int | None = None,
) -> None:
    """In the zygote's fork. Joins the entry's cgroups, asks the zygote (`ids_mapped`) to map
    a fresh user namespace, makes the entry's other namespaces, tells the kernel zygote
    about them (on `kernel_channel`, before anything of the sandbox runs), and forks the
    entry's PID 1, which ends in `become_init`. Returns in the fork that made PID 1; that
    one exits."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    os.dup2(request.console_fd, 1)
    os.dup2(request.console_fd, 2)
    os.close(request.console_fd)
    for_kernels = [os.dup(fd) for fd in request.cgroup_fds] if kernel_channel is not None else []
    # cgroup.procs files the host opened: a write of "0" moves the writer (the kernel
    # checks the opener's credentials, the host's, on cgroup v1). Before any namespace of
    # the entry's own, so the cgroup namespace's root is the entry's cgroup.
    for fd in request.cgroup_fds:
        os.write(fd, b"0")
        os.close(fd)
    linux.unshare(linux.CLONE_NEWUSER)
    ids_mapped()
    linux.unshare(ENTRY_NAMESPACES)
    if os.fork() == 0:
        try:
            if kernel_channel is not None:
                _describe_to_kernel_zygote(request, kernel_channel, for_kernels)
            _become_pid_one(request)
            become_init(request)
        except BaseException as exc:  # reported to the host, then gone
            _report_failure(request, exc)
            os._exit(1)
        os._exit(0)


def _describe_to_kernel_zygote(request: EntryRequest, channel: int, cgroups: list[int]) -> None:
    """The entry's namespaces (those of its PID 1, this process, before anything of the
    sandbox runs), its cgroups and confinement: where the kernel zygote puts its kernel."""
    names = ("user", "mnt", "net", "ipc", "uts", "cgroup", "pid")
    fds = [os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in names]
    fds.append(os.dup(request.seccomp_fd))
    roles = [f"ns:{name}" for name in names] + ["seccomp"] + ["cgroup"] * len(cgroups)
    try:
        sock = socket.socket(fileno=os.dup(channel))
        with sock:
            body = {"fds": roles, "capabilities": list(request.capabilities)}
            wire.send(sock, body, [*fds, *cgroups])
    finally:
        for fd in [*fds, *cgroups]:
            os.close(fd)


def _become_pid_one(request: EntryRequest) -> None:
    """The entry's PID 1 before it starts anything: its root, hostname, confinement and the
    report to the host, which answers once the entry's network is in place."""
    for step in root_steps(request):
        perform(step)
    for fd in (request.root_fd, *request.proc_fds.values()):
        os.close(fd)
    socket.sethostname(request.hostname)
    # The entry's network namespace is its own user namespace's, whose root (below) keeps
    # no CAP_NET_ADMIN; ports below 1024 open to every user of the sandbox, as in a jail.
    with open(f"/tmp/root{_UNPRIVILEGED_PORTS}", "w") as f:
        f.write("0")
    os.chdir("/tmp/root")
    linux.pivot_root_here()
    program = read_file(request.seccomp_fd)
    os.close(request.seccomp_fd)
    linux.limit_capabilities(capability_numbers(request.capabilities), linux.last_capability())
    linux.set_no_new_privs()
    linux.load_seccomp(program)
    os.environ.clear()
    os.environ.update({"PATH": DEFAULT_PATH, "HOME": "/root"})
    os.chdir("/root")
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    report = socket.socket(fileno=request.report_fd)
    wire.send_with_credentials(report, {"ready": True}, os.getpid(), os.getuid(), os.getgid())
    # The host attaches the network namespace, sets its addresses and routes, and answers.
    answer = wire.receive(report)
    report.close()
    if answer is None or not answer.body.get("go"):
        raise RuntimeError("the host did not let the entry start")


def perform(step: Step) -> None:
    match step:
        case Tmpfs(target, options, flags):
            linux.mount("tmpfs", target, "tmpfs", flags, options)
        case Attach(fd, target):
            linux.move_mount_fd(fd, target)
        case Bind(source, target):
            linux.mount(source, target, None, linux.MS_BIND)
        case Proc(target):
            flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
            linux.mount("proc", target, "proc", flags)
        case Devpts(target):
            linux.mount(
                "devpts",
                target,
                "devpts",
                linux.MS_NOSUID | linux.MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=620",
            )
        case MakeDir(path, mode):
            Path(path).mkdir(mode, parents=True, exist_ok=True)
        case MakeFile(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        case Symlink(path, points_to):
            Path(path).symlink_to(points_to)
        case RemountReadOnly(target, flags):
            linux.mount(
                None, target, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | flags
            )


def read_file(fd: int) -> bytes:
    """All of a file from its start (pread: the descriptor's offset is shared by its dups,
    which the kernel zygote reads too)."""
    data = b""
    while chunk := os.pread(fd, 65536, len(data)):
        data += chunk
    return data


def _report_failure(request: EntryRequest, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}"
    print(f"coppice-zygote: entry {request.entry_id} did not start: {message}", file=sys.stderr)
    # (failing that, the host stops waiting when the socket closes)
    with contextlib.suppress(OSError):
        wire.send(socket.socket(fileno=os.dup(request.report_fd)), {"error": message})
