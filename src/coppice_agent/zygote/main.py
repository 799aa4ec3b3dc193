"""The zygote process: imports the agent once, freezes its objects out of the garbage
collector's reach (so forks share those pages instead of touching them), then forks one
entry per request from the host until the host closes its socket.

It runs as root of the template's jail user namespace with CAP_SETUID, CAP_SETGID and
CAP_SETFCAP only (to map each fork's user namespace), PID 1 of a pid namespace of its own: the entries' PID
1s are re-parented to it and reaped here. Its pid namespace holds every entry it forked, so
it outlives the host's socket until the last of them has ended."""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import time
from types import FrameType

from coppice_agent.zygote import wire
from coppice_agent.zygote.child import become_entry, close_all_but
from coppice_agent.zygote.plan import BadRequest, EntryRequest

#: how long a fork may take to unshare its user namespace before the zygote gives up on it
MAP_TIMEOUT_S = 5.0


def preload() -> None:
    """Everything an entry's agent imports, once."""
    import coppice_agent.server  # noqa: F401


def _reap(_signum: int = 0, _frame: FrameType | None = None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _log(message: str) -> None:
    print(f"coppice-zygote: {message}", file=sys.stderr, flush=True)


def serve(control: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, _reap)
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
                fork_entry(EntryRequest.decode(message.body, message.fds))
            else:
                _log(f"unknown op {message.body.get('op')!r}")
        except BadRequest as exc:
            _log(str(exc))
        finally:
            for fd in message.fds:
                os.close(fd)
    # The host is gone (or stopping us): every entry still running is in our pid
    # namespace and would die with us, so wait for the last one.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def fork_entry(request: EntryRequest) -> None:
    to_zygote, from_child = os.pipe()
    from_zygote, to_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_zygote)
        os.close(to_child)
        close_all_but({*request.fds, from_child, from_zygote})

        def ids_mapped() -> None:
            os.write(from_child, b"u")
            if os.read(from_zygote, 1) != b"m":
                raise RuntimeError("the zygote did not map the entry's ids")
            os.close(from_child)
            os.close(from_zygote)

        try:
            become_entry(request, ids_mapped, _become_init)
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


def _become_init(request: EntryRequest) -> None:
    from coppice_agent.server import main as agent_main
    from coppice_agent.zygote.init import run_init

    os._exit(run_init(agent_main))


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    started = time.monotonic()
    preload()
    gc.collect()
    gc.freeze()
    _log(f"ready in {time.monotonic() - started:.2f} s")
    wire.send(control, {"ready": True})
    serve(control)
