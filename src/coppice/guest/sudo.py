#!/usr/bin/python3 -IS
"""/usr/bin/sudo in every Coppice template.

Where setuid works (a VM): Debian's own sudo, diverted to /usr/bin/sudo.distrib, runs with
this very command line. In a jail every process runs with no_new_privs, which makes exec
ignore the setuid bit, so there the sandbox's agent (which runs as root) runs the command
instead: this script sends its arguments, working directory, environment and its stdin,
stdout and stderr to the agent's sudo broker, relays between its terminal and the command's
when the broker gives the command a terminal of its own, forwards the signals it receives,
and ends as the command ended. The broker parses the options and decides who may.

Standard library only, and no site-packages or environment (-IS: one word, as a shebang
hands the interpreter everything after its path as a single argument): it starts in about
20 ms, and nothing in the caller's environment or directory changes what it imports. The
protocol is the one src/coppice_agent/sudo_wire.py describes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

REAL_SUDO = "/usr/bin/sudo.distrib"
SOCKET = "/run/coppice/sudo.sock"
SOCKET_ENV = "COPPICE_SUDO_SOCKET"
# What sudo itself relays to its command. Keyboard signals are not among them when the
# command has its own terminal: then ^C is a byte like any other, and that terminal turns
# it into SIGINT for the command's foreground job.
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
_CHUNK = 65536
# After the command has exited: how long output still arriving on its terminal is relayed
# (a quiet spell ends it sooner), so a background job that keeps printing cannot hold sudo.
_DRAIN_LIMIT = 2.0
_DRAIN_QUIET = 0.1

Message = dict[str, Any]


def setuid_works() -> bool:
    """False under no_new_privs (every jail). Unknown counts as false: the broker works
    wherever the agent runs, setuid or not."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("NoNewPrivs:"):
                    return line.split()[1] == "0"
    except OSError:
        pass
    return False


class Broker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.fds: list[int] = []

    def send(self, message: Message, fds: list[int] | None = None) -> None:
        data = (json.dumps(message) + "\n").encode()
        if fds:
            # The descriptors travel with the first byte; the rest is plain data.
            data = data[socket.send_fds(self.sock, [data], fds) :]
        if data:  # sendall(b"") still calls send(), which fails once the broker has closed
            self.sock.sendall(data)

    def read_some(self) -> bool:
        """Read what has arrived (blocking until something has); False once it hung up."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _CHUNK, 1)
        except ConnectionResetError:
            return False  # it closed with something of ours unread: a hangup all the same
        self.fds += fds
        self.buffer += data
        return bool(data)

    def next_message(self) -> Message | None:
        """A complete message already read, if there is one."""
        if b"\n" not in self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        message: Message = json.loads(line)
        return message

    def receive(self) -> Message | None:
        """The next message; None if the broker hung up first."""
        while True:
            message = self.next_message()
            if message is not None:
                return message
            if not self.read_some():
                return None

    def forward(self, signum: int, _frame: FrameType | None) -> None:
        # A broker that has gone shows at the next read.
        with contextlib.suppress(OSError):
            self.send({"signal": signum})


def main() -> int:
    if setuid_works() and os.access(REAL_SUDO, os.X_OK):
        os.execv(REAL_SUDO, sys.argv)
    path = os.environ.get(SOCKET_ENV) or SOCKET
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return fail(f"the Coppice sudo broker is not running (cannot connect to {path}: {reason})")
    broker = Broker(sock)
    try:
        cwd: str | None = os.getcwd()  # noqa: PTH109 - pathlib alone would add 5 ms to every sudo
    except OSError:
        cwd = None  # removed since; the command starts at /
    # A broker that has answered and hung up already has still answered: read that rather
    # than report the pipe.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        broker.send({"args": sys.argv[1:], "cwd": cwd, "env": dict(os.environ)}, stdio())
    for signum in FORWARDED:
        signal.signal(signum, broker.forward)
    message = broker.receive()
    if message is not None and message.get("started"):
        if message.get("pty") and broker.fds:
            message = relay_terminal(broker, broker.fds.pop())
        else:
            message = broker.receive()
    return finish(message)


def stdio() -> list[int]:
    """fds 0, 1 and 2 for the command; one that is closed here is /dev/null there."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def finish(message: Message | None) -> int:
    if message is None:
        return fail("lost the connection to the Coppice sudo broker")
    for stream, text in ((sys.stdout, message.get("stdout")), (sys.stderr, message.get("stderr"))):
        if text:
            with contextlib.suppress(OSError):
                stream.write(text)
                stream.flush()
    if "signal" in message:
        return die_by(int(message["signal"]))
    return int(message.get("exit", 1))


def die_by(signum: int) -> int:
    """End by the signal that ended the command, as sudo does, so that the caller's shell
    sees it (and, for SIGINT, a script stops). No core file: this process did not crash."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, OSError, ValueError):
        pass
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum  # a signal that does not end a process by default


def fail(problem: str) -> int:
    print(f"sudo: {problem}", file=sys.stderr)
    return 1


def relay_terminal(broker: Broker, master: int) -> Message | None:
    """The command runs on a terminal of its own: put this one in raw mode (so every key,
    ^C included, goes through to it), copy bytes both ways and window-size changes across
    until the broker reports the exit, then put this terminal back as it was."""
    import termios
    import tty

    os.set_blocking(master, False)
    out = next((fd for fd in (1, 2) if os.isatty(fd)), 0)
    saved = termios.tcgetattr(0)

    def resize(_signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetwinsize(master, termios.tcgetwinsize(0))

    signal.signal(signal.SIGWINCH, resize)
    tty.setraw(0, termios.TCSADRAIN)
    try:
        return _pump(broker, master, out)
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
        os.close(master)


def _pump(broker: Broker, master: int, out: int) -> Message | None:
    import select

    pending = b""  # typed, not yet taken by the command's terminal
    reading_input = True
    master_open = True
    while True:
        message = broker.next_message()
        if message is not None:
            break
        readers: list[Any] = [broker.sock]
        if master_open:
            readers.append(master)
        if reading_input and len(pending) < _CHUNK:
            readers.append(0)
        writers = [master] if pending and master_open else []
        ready, can_write, _ = select.select(readers, writers, [])
        if broker.sock in ready and not broker.read_some():
            return None
        if master in ready:
            master_open = _copy_out(master, out)
        if 0 in ready:
            data = _read(0)
            if data is None:
                reading_input = False  # this terminal hung up
            else:
                pending += data
        if master in can_write:
            try:
                pending = pending[os.write(master, pending) :]
            except BlockingIOError:
                pass
            except OSError:
                pending, reading_input = b"", False
    if master_open:
        _drain(master, out)
    return message


def _drain(master: int, out: int) -> None:
    import select

    deadline = time.monotonic() + _DRAIN_LIMIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], _DRAIN_QUIET)
        if not ready or not _copy_out(master, out):
            return


def _copy_out(master: int, out: int) -> bool:
    """Relay what the command's terminal has; False once it has closed."""
    try:
        data = os.read(master, _CHUNK)
    except BlockingIOError:
        return True
    except OSError:
        return False  # EIO: the last process holding the terminal has gone
    if not data:
        return False
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(out, view) :]
        except OSError:
            break  # this terminal is gone; keep draining the other one
    return True


def _read(fd: int) -> bytes | None:
    """What was typed; None once the terminal has hung up (EIO, or end of file)."""
    try:
        return os.read(fd, _CHUNK) or None
    except BlockingIOError:
        return b""
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
