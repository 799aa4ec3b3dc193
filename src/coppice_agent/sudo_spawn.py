"""Starting a command the sudo broker has approved, as its target account, on the caller's
own stdin, stdout and stderr, in a session of its own (so a signal to its process group
reaches the whole tree it spawns).

When the caller's stdin is a terminal the command gets a new terminal instead, as Debian's
sudo does (`use_pty`), and the shim relays between the two. The caller's own terminal cannot
be the command's: it is already the controlling terminal of the caller's session, and taking
it from that session (TIOCSCTTY with force) needs CAP_SYS_ADMIN in the host's user
namespace, which no jail has. A terminal of its own gives the command everything a shell
needs: job control, ^C and ^Z from the keyboard, and window-size changes.

As in spawn.py, nothing runs Python between fork and exec (the agent has threads): every
step is a `Popen` parameter, and util-linux's setsid(1) makes the terminal controlling. The
command, root's or not, is born the OOM killer's candidate (oom.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import termios
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coppice_agent.oom import USER_FORKS
from coppice_agent.sudo_plan import Launch

SETSID = "/usr/bin/setsid"


@dataclass(frozen=True)
class SudoChild:
    popen: subprocess.Popen[bytes]
    #: the new terminal's master, for the shim; None when the command runs on the caller's fds
    pty_master: int | None


def start_child(launch: Launch, stdio: Sequence[int]) -> SudoChild:
    """Fork and exec (blocking: run it in a worker thread). `stdio` stays the caller's."""
    identity: dict[str, Any] = {
        "user": launch.user.uid,
        "group": launch.gid,
        # Always passed, even empty: otherwise the child keeps the agent's groups.
        "extra_groups": list(launch.groups),
    }
    if os.isatty(stdio[0]) and os.access(SETSID, os.X_OK):
        return _start_on_new_terminal(launch, stdio, identity)
    with USER_FORKS.forking():
        popen = subprocess.Popen(
            list(launch.argv),
            executable=launch.executable,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            cwd=launch.cwd,
            env=launch.env,
            start_new_session=True,
            **identity,
        )
    return SudoChild(popen, pty_master=None)


def _start_on_new_terminal(
    launch: Launch, stdio: Sequence[int], identity: dict[str, Any]
) -> SudoChild:
    """The new terminal replaces each of the caller's fds that is a terminal; the others
    (`sudo cmd > file` from a shell) stay as they are.

    setsid(1) calls setsid() and TIOCSCTTY on its stdin, then execs the command, so the pid
    Popen reports is the command's and leads its session and process group. Popen must not
    start the session itself: setsid(1) forks when it already leads a process group."""
    master, slave = os.openpty()
    try:
        _copy_terminal(stdio[0], slave)
        # The target's terminal is theirs, as login(1) would leave it.
        os.fchown(slave, launch.user.uid, -1)
        stdout, stderr = (slave if os.isatty(fd) else fd for fd in stdio[1:3])
        with USER_FORKS.forking():
            popen = subprocess.Popen(
                [SETSID, "--ctty", "--", launch.executable, *launch.argv[1:]],
                stdin=slave,
                stdout=stdout,
                stderr=stderr,
                cwd=launch.cwd,
                env=launch.env,
                **identity,
            )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return SudoChild(popen, pty_master=master)


def _copy_terminal(source: int, dest: int) -> None:
    """Start the new terminal as the caller's is: its modes (erase and interrupt keys,
    echo) and its size. A caller terminal that refuses either leaves the defaults."""
    with contextlib.suppress(termios.error, OSError):
        termios.tcsetattr(dest, termios.TCSANOW, termios.tcgetattr(source))
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(dest, termios.TIOCSWINSZ, size)
