"""Starting a command as a sandbox user, on pipes or on a PTY, in a session of its own so that
a signal to its process group reaches the whole tree it spawns.

Nothing here runs Python in the child between fork and exec (no `preexec_fn`): the agent has
threads (the event loop's workers, the identity port), and a forked copy of a threaded process
can deadlock on a lock some other thread held at the fork. Everything the child needs is a
`Popen` parameter, done by CPython's C code, except making the PTY the session's controlling
terminal; util-linux's setsid(1) does that and then execs the command. The child is born
the OOM killer's candidate, not the agent (oom.py)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import termios
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coppice_agent.oom import USER_FORKS
from coppice_agent.rpc.process.process_pb import PTY
from coppice_agent.users import SandboxUser

# Debian's util-linux (essential, so in every template) puts it here. An absolute path: the
# command's own PATH must not choose what runs as the user before their command does.
SETSID = "/usr/bin/setsid"


class NoControllingTerminal(RuntimeError):
    """A PTY was asked for, but nothing here can make it the process's terminal."""


@dataclass(frozen=True)
class Child:
    """A command just started: the descriptors the agent keeps of it are non-blocking."""

    popen: subprocess.Popen[bytes]
    #: the output descriptors the agent reads, by the `ProcessEvent` field they feed
    outputs: dict[str, int]
    stdin: int | None
    pty_master: int | None


@dataclass(frozen=True)
class SpawnSpec:
    """Everything a start needs; `spawn` blocks (fork and exec), so it runs in a worker thread."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    user: SandboxUser
    pty: PTY | None
    with_stdin: bool

    def spawn(self) -> Child:
        if self.pty is not None:
            return self._spawn_pty(self.pty)
        return self._spawn_pipes()

    def _identity(self) -> dict[str, Any]:
        if self.user.is_current:
            return {}
        return {
            "user": self.user.uid,
            "group": self.user.gid,
            # Always passed, even empty: otherwise the child keeps the agent's groups.
            "extra_groups": list(self.user.groups),
        }

    def _spawn_pipes(self) -> Child:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if self.with_stdin else (subprocess.DEVNULL, -1)
        child_ends = [out_w, err_w] + ([in_r] if self.with_stdin else [])
        parent_ends = [out_r, err_r] + ([in_w] if self.with_stdin else [])
        try:
            with USER_FORKS.forking():
                popen = subprocess.Popen(
                    self.argv,
                    stdin=in_r,
                    stdout=out_w,
                    stderr=err_w,
                    cwd=self.cwd,
                    env=self.env,
                    start_new_session=True,
                    **self._identity(),
                )
        except BaseException:
            for fd in child_ends + parent_ends:
                os.close(fd)
            raise
        for fd in child_ends:
            os.close(fd)
        for fd in parent_ends:
            os.set_blocking(fd, False)
        return Child(
            popen,
            outputs={"stdout": out_r, "stderr": err_r},
            stdin=in_w if self.with_stdin else None,
            pty_master=None,
        )

    def _spawn_pty(self, pty: PTY) -> Child:
        """The PTY becomes the controlling terminal of the command's new session, so job
        control works, ^C reaches the foreground job and a resize sends SIGWINCH.

        setsid(1) calls setsid() and TIOCSCTTY on its stdin, then execs the command, so the
        pid Popen reports is the command's and leads its session and process group. Popen
        must not start the session itself: setsid(1) forks when it already leads a process
        group, and the command would then run under a pid nobody knows."""
        if not os.access(SETSID, os.X_OK):
            raise NoControllingTerminal(
                f"a PTY needs {SETSID} (util-linux) in the sandbox, and it is missing"
            )
        # Popen only ever execs setsid here, so it cannot report a missing command; setsid
        # would print that on the terminal and exit 127. Look first, as exec will.
        _find_program(self.argv[0], self.env, self.cwd)
        master, slave = os.openpty()
        try:
            if pty.size is not None:
                set_winsize(master, pty.size)
            if not self.user.is_current:
                # The user's terminal is theirs, as login(1) would leave it.
                os.fchown(slave, self.user.uid, -1)
            with USER_FORKS.forking():
                popen = subprocess.Popen(
                    [SETSID, "--ctty", "--", *self.argv],
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=self.cwd,
                    env=self.env,
                    **self._identity(),
                )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        return Child(popen, outputs={"pty": master}, stdin=None, pty_master=master)


def set_winsize(fd: int, size: PTY.Size) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


def _find_program(name: str, env: Mapping[str, str], cwd: str) -> None:
    """Raise what Popen raises when exec cannot run `name`: FileNotFoundError when no
    candidate exists, PermissionError when one exists but is not executable.

    As the agent sees it: a command only the agent may execute gets past this, and then
    setsid reports it on the terminal (exit status 126) as a shell would."""
    if "/" in name:
        candidates = [os.path.join(cwd, name)]
    else:
        # execvp's search, in the command's own PATH; relative entries start at its cwd.
        candidates = [os.path.join(cwd, directory, name) for directory in os.get_exec_path(env)]
    denied = False
    for candidate in map(Path, candidates):
        if not candidate.exists():
            continue
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return
        denied = True
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
