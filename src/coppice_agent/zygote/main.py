"""The zygote process: imports the agent once, freezes its objects out of the garbage
collector's reach (so forks share those pages instead of touching them), then forks one
entry per request from the host until the host closes its socket.

It runs as root of the template's jail user namespace with CAP_SETUID, CAP_SETGID and
CAP_SETFCAP only (to map each fork's user namespace), PID 1 of a pid namespace of its own:
the entries' PID 1s are re-parented to it and reaped here. Its pid namespace holds every
entry it forked, so it outlives the host's socket until the last of them has ended.

Beside it runs the template's kernel zygote (zygote/kernels.py), its child: each entry gets
a socket to it, on which the entry's fork describes its namespaces and the agent asks for
its default kernel."""

from __future__ import annotations

import functools
import gc
import os
import select
import signal
import socket
import sys
import time

from coppice_agent.zygote import wire
from coppice_agent.zygote.child import become_entry, close_all_but
from coppice_agent.zygote.plan import BadRequest, EntryRequest
from coppice_agent.zygote.reaping import reap_exited

#: how long a fork may take to unshare its user namespace before the zygote gives up on it
MAP_TIMEOUT_S = 5.0
KERNEL_ZYGOTE_SCRIPT = "/usr/lib/coppice/kernel-zygote.py"
KERNEL_ZYGOTE_TIMEOUT_S = 60.0


def preload() -> None:
    """Everything an entry's agent imports, once."""
    import coppice_agent.server  # noqa: F401


def _log(message: str) -> None:
    print(f"coppice-zygote: {message}", file=sys.stderr, flush=True)


def serve(control: socket.socket, kernels: socket.socket | None) -> None:
    signal.signal(signal.SIGCHLD, reap_exited)
    while True:
        try:
            message = wire.receive(control)
        except wire.WireError as exc:
            _log(f"bad message: {exc}")
            continue
        if message is None:
            break
        try:
            if message.body.get("op") == "entry":
                fork_entry(EntryRequest.decode(message.body, message.fds), kernels)
            else:
                _log(f"unknown op {message.body.get('op')!r}")
        except BadRequest as exc:
            _log(str(exc))
        finally:
            for fd in message.fds:
                os.close(fd)
    # The host is gone (or stopping us): every entry still running is in our pid
    # namespace and would die with us, so wait for the last one.
    if kernels is not None:
        kernels.close()  # the kernel zygote ends; the kernels it forked are the entries'
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def start_kernel_zygote() -> socket.socket | None:
    """The template's kernel zygote, once it has done its imports; None where it cannot
    (no ipykernel in the template's python3): entries then start their kernels themselves."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            close_all_but({0, 1, 2, theirs.fileno()})
            os.set_inheritable(theirs.fileno(), True)
            os.execvp("python3", ["python3", KERNEL_ZYGOTE_SCRIPT, str(theirs.fileno())])
        finally:
            os._exit(127)
    theirs.close()
    ready, _, _ = select.select([ours], [], [], KERNEL_ZYGOTE_TIMEOUT_S)
    hello = wire.receive(ours) if ready else None
    if hello is None or not hello.body.get("ready"):
        _log("no kernel zygote: entries start their own kernels")
        ours.close()
        return None
    return ours


def _kernel_channel(kernels: socket.socket | None) -> socket.socket | None:
    """A fresh socket to the kernel zygote for one entry (its other end is the kernel
    zygote's), or None."""
    if kernels is None:
        return None
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        wire.send(kernels, {"op": "entry"}, [theirs.fileno()])
    except OSError as exc:
        _log(f"the kernel zygote is gone: {exc}")
        mine.close()
        return None
    finally:
        theirs.close()
    return mine


def fork_entry(request: EntryRequest, kernels: socket.socket | None = None) -> None:
    channel = _kernel_channel(kernels)
    try:
        _fork_entry(request, channel.fileno() if channel is not None else None)
    finally:
        if channel is not None:
            channel.close()


def _fork_entry(request: EntryRequest, channel: int | None) -> None:
    to_zygote, from_child = os.pipe()
    from_zygote, to_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_zygote)
        os.close(to_child)
        keep = {*request.fds, from_child, from_zygote}
        if channel is not None:
            keep.add(channel)
        close_all_but(keep)

        def ids_mapped() -> None:
            os.write(from_child, b"u")
            if os.read(from_zygote, 1) != b"m":
                raise RuntimeError("the zygote did not map the entry's ids")
            os.close(from_child)
            os.close(from_zygote)

        try:
            become_entry(request, ids_mapped, functools.partial(_become_init, channel), channel)
        except BaseException as exc:  # reported, then gone
            from coppice_agent.zygote.child import _report_failure

            _report_failure(request, exc)
            os._exit(1)
        os._exit(0)
    os.close(from_child)
    os.close(from_zygote)
    try:
        ready, _, _ = select.select([to_zygote], [], [], MAP_TIMEOUT_S)
        if ready and os.read(to_zygote, 1) == b"u":
            ids = f"0 0 {request.uid_count}\n"
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(ids)
            os.write(to_child, b"m")
        else:
            _log(f"entry {request.entry_id}: its fork did not get as far as its user namespace")
            os.kill(pid, signal.SIGKILL)
    except OSError as exc:
        _log(f"entry {request.entry_id}: cannot map its ids: {exc}")
        os.kill(pid, signal.SIGKILL)
    finally:
        os.close(to_zygote)
        os.close(to_child)


def _become_init(kernel_channel: int | None, request: EntryRequest) -> None:
    from coppice_agent import kernel_fork
    from coppice_agent.server import main as agent_main
    from coppice_agent.zygote.init import run_init

    def start_agent() -> None:
        if kernel_channel is not None:
            kernel_fork.CHANNEL = socket.socket(fileno=kernel_channel)
        agent_main()

    code = run_init(start_agent, kernel_channel)
    os._exit(code)


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    started = time.monotonic()
    kernels = start_kernel_zygote()
    preload()
    gc.collect()
    gc.freeze()
    _log(f"ready in {time.monotonic() - started:.2f} s")
    wire.send(control, {"ready": True, "kernels": kernels is not None})
    serve(control, kernels)
