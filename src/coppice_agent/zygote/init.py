"""The PID 1 of a forked entry, doing what guest/init.sh does for a bwrap-started jail:
start sshd (fork and exec) and the agent (a fork of the zygote's image that is already past
its imports), reap every orphan re-parented to PID 1, pass TERM, INT and HUP on to both,
and end the entry when the agent ends."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from coppice_agent.zygote import linux

INSTANCE_FILE = "/etc/coppice-instance"
#: what the bwrap-started jail's init and agent show as their command lines (guest/init.sh
#: and guest/agent.py); a forked entry's show the same
INIT_COMMAND = (["/bin/sh", "/usr/lib/coppice/init"], "init")
AGENT_COMMAND = (["python3", "-I", "-S", "/usr/lib/coppice/agent.py"], "python3")
#: the line PID 1 ends the console with: a forked entry's host has no process object to
#: read the exit status from, so its post-mortem reads it here (coppice/substrates/
#: post_mortem.py knows the same words)
EXIT_LINE = "coppice-init: exit status {code}"
SSHD = "/usr/sbin/sshd"
SSHD_LOG = "/var/log/sshd.log"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def instance_environment(text: str) -> dict[str, str]:
    """The KEY=VALUE lines of /etc/coppice-instance (the host writes them plain)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.isidentifier():
            found[key] = value
    return found


def exit_code(status: int) -> int:
    """A wait status as sh's `wait` reports it: the exit code, or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def run_init(agent_main: Callable[[], None], agent_only_fd: int | None = None) -> int:
    """PID 1's life; returns the exit code the entry ends with (the agent's).
    `agent_only_fd`: a descriptor the agent keeps and PID 1 closes once it is forked."""
    _show_as(*INIT_COMMAND)
    with open(INSTANCE_FILE) as f:
        os.environ.update(instance_environment(f.read()))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    sshd = _start_sshd()
    agent = _fork(lambda: _run_agent(agent_main))
    if agent_only_fd is not None:
        os.close(agent_only_fd)
    children = [pid for pid in (agent, sshd) if pid > 0]

    def forward(signum: int, _: FrameType | None) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        if pid == agent:
            code = exit_code(status)
            print(EXIT_LINE.format(code=code), file=sys.stderr, flush=True)
            return code


def _fork(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for signum in (*FORWARDED, signal.SIGQUIT, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            body()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # the child's last word, on its console
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _start_sshd() -> int:
    def exec_sshd() -> None:
        log = os.open(SSHD_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 2)
        os.close(log)
        os.execve(SSHD, [SSHD, "-D", "-e"], dict(os.environ))

    return _fork(exec_sshd)


def _show_as(argv: list[str], comm: str) -> None:
    try:
        linux.set_command_line(argv, comm)
    except (OSError, ValueError) as exc:
        print(f"coppice-init: cannot show as {argv[-1]}: {exc}", file=sys.stderr)


def _run_agent(agent_main: Callable[[], None]) -> None:
    _show_as(*AGENT_COMMAND)
    # Every fork shares the zygote's random state; the agent's own must be its own.
    random.seed()
    agent_main()
