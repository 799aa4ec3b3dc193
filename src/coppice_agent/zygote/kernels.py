"""The template's kernel zygote: the template's own python3 (with its site-packages, as a
kernel runs) after `import ipykernel.kernelapp`, forking one Python kernel per entry into
that entry's namespaces.

Each entry has one socket to it, made by the agent zygote when it forks the entry. Its
first message comes from the entry's fork before anything of the sandbox runs: the entry's
namespaces (/proc/self/ns of the fork), its cgroup.procs files, its seccomp program and
capabilities. The second is the agent's request for its default kernel (user, cwd, env,
connection file, stdio). The kernel is forked into exactly the namespaces of the first
message, whatever the second says, and the socket is closed after it: a sandbox can only
ever get one kernel, in its own namespaces. Later kernels start the ordinary way.

The fork joins the entry's cgroups, then its user namespace (this process is root of the
parent one, which owns it) and every other namespace; its own fork is in the entry's pid
namespace, drops the bounding set, becomes the sandbox user, takes no_new_privs and the
jail's seccomp filter, and runs IPKernelApp with the connection file.
"""

from __future__ import annotations

import contextlib
import gc
import os
import selectors
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coppice_agent.zygote import linux, wire
from coppice_agent.zygote.child import read_file
from coppice_agent.zygote.plan import capability_numbers
from coppice_agent.zygote.reaping import reap_exited

#: the namespaces of an entry, in the order the fork joins them (user first: the others
#: belong to it) and the names of their /proc/self/ns files
NAMESPACE_FILES = (
    ("user", linux.CLONE_NEWUSER),
    ("mnt", linux.CLONE_NEWNS),
    ("net", linux.CLONE_NEWNET),
    ("ipc", linux.CLONE_NEWIPC),
    ("uts", linux.CLONE_NEWUTS),
    ("cgroup", linux.CLONE_NEWCGROUP),
    ("pid", linux.CLONE_NEWPID),
)


@dataclass
class EntryNamespaces:
    """What the entry's fork sent: descriptors by role, and its confinement."""

    namespaces: dict[str, int]
    cgroups: list[int]
    seccomp: int
    capabilities: tuple[str, ...]

    @classmethod
    def decode(cls, body: Mapping[str, Any], fds: Sequence[int]) -> EntryNamespaces:
        roles = body.get("fds")
        if not isinstance(roles, list) or len(roles) != len(fds):
            raise ValueError("the fds list does not match the descriptors sent")
        namespaces: dict[str, int] = {}
        cgroups: list[int] = []
        seccomp = -1
        for role, fd in zip(roles, fds, strict=True):
            if role == "cgroup":
                cgroups.append(fd)
            elif role == "seccomp":
                seccomp = fd
            elif isinstance(role, str) and role.startswith("ns:"):
                namespaces[role[3:]] = fd
        wanted = {name for name, _ in NAMESPACE_FILES}
        if set(namespaces) != wanted or seccomp < 0:
            raise ValueError("an entry's namespaces and seccomp program are all needed")
        caps = tuple(str(c) for c in body.get("capabilities", ()))
        capability_numbers(caps)  # raises KeyError on an unknown name
        return cls(namespaces, cgroups, seccomp, caps)

    def close(self) -> None:
        for fd in [*self.namespaces.values(), *self.cgroups, self.seccomp]:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class KernelRequest:
    connection_file: str
    uid: int
    gid: int
    groups: list[int]
    cwd: str
    env: dict[str, str]
    stdio: list[int] = field(default_factory=list)
    oom_score_adj: int = 1000

    @classmethod
    def decode(cls, body: Mapping[str, Any], fds: Sequence[int]) -> KernelRequest:
        if len(fds) != 3:
            raise ValueError("a kernel request carries stdin, stdout and stderr")
        env = body["env"]
        if not isinstance(env, dict):
            raise ValueError("env is an object")
        return cls(
            connection_file=str(body["connection_file"]),
            uid=int(body["uid"]),
            gid=int(body["gid"]),
            groups=[int(g) for g in body.get("groups", [])],
            cwd=str(body["cwd"]),
            env={str(k): str(v) for k, v in env.items()},
            stdio=list(fds),
            oom_score_adj=int(body.get("oom_score_adj", 1000)),
        )


def _log(message: str) -> None:
    print(f"coppice-kernel-zygote: {message}", file=sys.stderr, flush=True)


def serve(control: socket.socket) -> None:
    """Take entry sockets from the agent zygote (`control`) until it closes, and serve each
    entry's two messages."""
    signal.signal(signal.SIGCHLD, reap_exited)
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ, None)
    entries: dict[int, EntryNamespaces | None] = {}
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                message = wire.receive(sock)
            except (OSError, wire.WireError) as exc:
                _log(f"bad message: {exc}")
                message = None
            if sock is control:
                if message is None:
                    return  # the agent zygote is gone; running kernels are not ours
                for fd in message.fds:
                    entry = socket.socket(fileno=fd)
                    entries[entry.fileno()] = None
                    sel.register(entry, selectors.EVENT_READ, None)
                continue
            known = entries.get(sock.fileno())
            done = message is None
            try:
                if message is not None and known is None:
                    entries[sock.fileno()] = EntryNamespaces.decode(message.body, message.fds)
                elif message is not None and known is not None:
                    request = KernelRequest.decode(message.body, message.fds)
                    _fork_kernel(known, request, sock)
                    for fd in request.stdio:
                        os.close(fd)
                    done = True
            except (KeyError, TypeError, ValueError) as exc:
                _log(f"bad entry message: {exc!r}")
                if message is not None:
                    for fd in message.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                done = True
            if done:
                sel.unregister(sock)
                namespaces = entries.pop(sock.fileno(), None)
                if namespaces is not None:
                    namespaces.close()
                sock.close()


def _fork_kernel(entry: EntryNamespaces, request: KernelRequest, reply: socket.socket) -> None:
    if os.fork() != 0:
        return
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        keep = {*entry.namespaces.values(), *entry.cgroups, entry.seccomp, *request.stdio}
        keep.add(reply.fileno())
        from coppice_agent.zygote.child import close_all_but

        close_all_but(keep)
        for fd in entry.cgroups:
            os.write(fd, b"0")
            os.close(fd)
        for name, nstype in NAMESPACE_FILES:
            linux.setns(entry.namespaces[name], nstype)
            os.close(entry.namespaces[name])
        if os.fork() == 0:
            _become_kernel(entry, request, reply)
        code = 0
    except BaseException as exc:  # the kernel request fails; the agent starts one itself
        _log(f"cannot fork a kernel: {exc!r}")
        with contextlib.suppress(OSError):
            wire.send(reply, {"error": repr(exc)})
    os._exit(code)


def _become_kernel(entry: EntryNamespaces, request: KernelRequest, reply: socket.socket) -> None:
    code = 1
    try:
        os.setsid()
        # A user process: born the OOM killer's candidate (coppice_agent.oom).
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(request.oom_score_adj))
        for target, fd in enumerate(request.stdio):
            os.dup2(fd, target)
            os.close(fd)
        program = read_file(entry.seccomp)
        os.close(entry.seccomp)
        linux.limit_capabilities(capability_numbers(entry.capabilities), linux.last_capability())
        os.setgroups(request.groups)
        os.setresgid(request.gid, request.gid, request.gid)
        os.setresuid(request.uid, request.uid, request.uid)
        linux.set_no_new_privs()
        linux.load_seccomp(program)
        os.environ.clear()
        os.environ.update(request.env)
        os.chdir(request.cwd)
        wire.send(reply, {"pid": os.getpid()})
        reply.close()
        _run_kernel(request.connection_file)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        _log(f"the kernel did not start: {exc!r}")
        with contextlib.suppress(OSError):
            wire.send(reply, {"error": repr(exc)})
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _user_site_for(home: str) -> None:
    """site.py put root's user site on sys.path when this process started; the kernel's is
    its user's, as `python3 -m ipykernel_launcher` run by that user would have it."""
    import site

    old = site.getusersitepackages()
    if old in sys.path:
        sys.path.remove(old)
    site.USER_BASE = None
    site.USER_SITE = None
    os.environ.setdefault("HOME", home)
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        site.addsitedir(site.getusersitepackages())


def _run_kernel(connection_file: str) -> None:
    for name in [m for m in sys.modules if m == "coppice_agent" or m.startswith("coppice_agent.")]:
        del sys.modules[name]
    _user_site_for(os.environ.get("HOME", "/"))
    from ipykernel import kernelapp

    sys.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file]
    kernelapp.launch_new_instance(argv=["-f", connection_file])


def preload() -> None:
    import ipykernel.ipkernel
    import ipykernel.kernelapp  # noqa: F401


def main(control_fd: int) -> None:
    control = socket.socket(fileno=control_fd)
    preload()
    gc.collect()
    gc.freeze()
    wire.send(control, {"ready": True})
    serve(control)
