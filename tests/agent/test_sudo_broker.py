"""The sudo broker with the real /usr/bin/sudo shim: the broker on its own event loop in a
thread (as root, as the agent runs), the shim as `nobody` under no_new_privs, as every process
in a jail runs, so that a setuid sudo could not have worked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from coppice_agent.sudo_broker import SOCKET_ENV, serve_sudo
from coppice_agent.sudoers import SudoersFiles
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the broker switches users: needs root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

NOBODY = pwd.getpwnam("nobody")
DAEMON = pwd.getpwnam("daemon")  # an account no grant names


@dataclass
class Broker:
    root: Path
    socket: Path
    shim: Path
    loop: asyncio.AbstractEventLoop
    task: asyncio.Task[None]


@contextlib.contextmanager
def running_broker() -> Iterator[Broker]:
    # Not pytest's tmp_path: `nobody` must be able to reach the socket and the shim.
    root = Path(tempfile.mkdtemp(prefix="coppice-sudo-"))
    root.chmod(0o755)
    (root / "sudoers").write_text("Defaults env_reset\nroot ALL=(ALL:ALL) ALL\n")
    (root / "sudoers.d").mkdir()
    (root / "sudoers.d" / "grants").write_text("nobody ALL=(ALL:ALL) NOPASSWD: ALL\n")
    # Installed as a template installs it, so that its own #! line is what runs it.
    shim = root / "sudo"
    shim.write_bytes(resources.files("coppice.guest").joinpath("sudo.py").read_bytes())
    shim.chmod(0o755)
    sock = root / "sudo.sock"
    files = SudoersFiles(main=root / "sudoers", directory=root / "sudoers.d")
    loop = asyncio.new_event_loop()
    task = loop.create_task(serve_sudo(str(sock), sudoers=files))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert wait_until(sock.exists), "the broker did not start listening"
    try:
        yield Broker(root, sock, shim, loop, task)
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=10)
        loop.close()
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with running_broker() as running:
        yield running


def shim_argv(broker: Broker, *args: str, uid: int = NOBODY.pw_uid) -> list[str]:
    gid = pwd.getpwuid(uid).pw_gid
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--no-new-privs",
        str(broker.shim),
        *args,
    ]


def shim_env(broker: Broker, **extra: str) -> dict[str, str]:
    return {SOCKET_ENV: str(broker.socket), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **extra}


def sudo(
    broker: Broker,
    *args: str,
    uid: int = NOBODY.pw_uid,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        shim_argv(broker, *args, uid=uid),
        input=stdin,
        capture_output=True,
        text=True,
        env=env or shim_env(broker),
        cwd=broker.root,
        timeout=20,
    )


def test_the_shim_really_runs_without_privileges(broker: Broker) -> None:
    done = subprocess.run(
        [*shim_argv(broker)[:-1], "/bin/grep", "NoNewPrivs", "/proc/self/status"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["NoNewPrivs:", "1"]


def test_an_allowed_account_runs_as_root(broker: Broker) -> None:
    done = sudo(broker, "-n", "id", "-u")
    assert (done.returncode, done.stdout, done.stderr) == (0, "0\n", "")


def test_the_exit_status_passes_through(broker: Broker) -> None:
    assert sudo(broker, "sh", "-c", "exit 7").returncode == 7


def test_stdin_is_the_callers(broker: Broker) -> None:
    done = sudo(broker, "cat", stdin="hi\n")
    assert (done.returncode, done.stdout) == (0, "hi\n")


def test_another_target_user(broker: Broker) -> None:
    done = sudo(broker, "-u", "daemon", "sh", "-c", 'echo "$(id -un) $HOME $USER"')
    assert done.stdout == f"daemon {DAEMON.pw_dir} daemon\n"


def test_the_environment_is_reset_unless_preserved(broker: Broker) -> None:
    env = shim_env(broker, FOO="bar")
    reset = dict(line.split("=", 1) for line in sudo(broker, "env", env=env).stdout.splitlines())
    assert "FOO" not in reset
    assert reset["HOME"] == "/root"
    assert reset["SUDO_USER"] == "nobody"
    assert reset["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert reset["LANG"] == "C.UTF-8"
    assert "FOO=bar" in sudo(broker, "-E", "env", env=env).stdout.splitlines()
    assert "BAR=1" in sudo(broker, "BAR=1", "env").stdout.splitlines()


def test_a_command_runs_in_the_callers_directory(broker: Broker) -> None:
    assert sudo(broker, "pwd").stdout == f"{broker.root}\n"


def test_a_refused_account_gets_sudos_answer_and_nothing_runs(broker: Broker) -> None:
    done = sudo(broker, "touch", str(broker.root / "ran"), uid=DAEMON.pw_uid)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "daemon is not in the sudoers file.\n"
    assert not (broker.root / "ran").exists()
    done = sudo(broker, "-n", "true", uid=DAEMON.pw_uid)
    assert (done.returncode, done.stderr) == (1, "sudo: a password is required\n")


def test_an_unknown_command_is_reported_as_sudo_does(broker: Broker) -> None:
    done = sudo(broker, "no-such-command")
    assert (done.returncode, done.stderr) == (1, "sudo: no-such-command: command not found\n")


def test_no_broker_is_a_clear_message(broker: Broker) -> None:
    done = sudo(broker, "true", env=shim_env(broker, **{SOCKET_ENV: "/nonexistent/sudo.sock"}))
    assert done.returncode == 1
    assert done.stderr.startswith("sudo: the Coppice sudo broker is not running (")
    assert "/nonexistent/sudo.sock" in done.stderr


def test_a_command_killed_by_a_signal_ends_sudo_by_it(broker: Broker) -> None:
    assert sudo(broker, "sh", "-c", "kill -TERM $$").returncode == -signal.SIGTERM


def test_signals_sent_to_sudo_reach_the_command(broker: Broker) -> None:
    script = 'trap "echo got-term; exit 3" TERM; echo started; while :; do sleep 0.05; done'
    with subprocess.Popen(
        shim_argv(broker, "sh", "-c", script),
        stdout=subprocess.PIPE,
        text=True,
        env=shim_env(broker),
        cwd=broker.root,
    ) as shim:
        assert shim.stdout is not None
        assert shim.stdout.readline() == "started\n"
        shim.send_signal(signal.SIGTERM)
        assert shim.wait(timeout=10) == 3
        assert shim.stdout.read() == "got-term\n"


def test_a_killed_sudo_takes_its_command_with_it(broker: Broker) -> None:
    """SIGKILL to sudo's process group (how E2B kills a command) must not leave the command
    running under the agent."""
    with subprocess.Popen(
        shim_argv(broker, "sh", "-c", "echo $$; exec sleep 30"),
        stdout=subprocess.PIPE,
        text=True,
        env=shim_env(broker),
        cwd=broker.root,
    ) as shim:
        assert shim.stdout is not None
        pid = int(shim.stdout.readline())
        shim.kill()
        shim.wait(timeout=10)
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)


def test_a_stopping_broker_kills_what_it_runs() -> None:
    with (
        running_broker() as broker,
        subprocess.Popen(
            shim_argv(broker, "sh", "-c", "echo $$; exec sleep 30"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=shim_env(broker),
            cwd=broker.root,
        ) as shim,
    ):
        assert shim.stdout is not None and shim.stderr is not None
        pid = int(shim.stdout.readline())
        broker.loop.call_soon_threadsafe(broker.task.cancel)
        assert shim.wait(timeout=10) == 1
        assert shim.stderr.read() == "sudo: lost the connection to the Coppice sudo broker\n"
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)


@pytest.mark.skipif(Path("/usr/bin/sudo.distrib").exists(), reason="a real sudo would run")
def test_without_no_new_privs_and_no_real_sudo_the_broker_still_serves(broker: Broker) -> None:
    argv = shim_argv(broker, "id", "-u")
    argv.remove("--no-new-privs")
    done = subprocess.run(argv, capture_output=True, text=True, env=shim_env(broker), timeout=20)
    assert (done.returncode, done.stdout) == (0, "0\n")


class Terminal:
    """The shim on a terminal of its own, as in an E2B PTY or an ssh session."""

    def __init__(self, broker: Broker, *args: str) -> None:
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(
            ["/usr/bin/setsid", "--ctty", *shim_argv(broker, *args)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=shim_env(broker, TERM="xterm"),
            cwd=broker.root,
        )
        os.close(slave)
        self.output = b""

    def read_until(self, wanted: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.output and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.master, 4096)
                except OSError:
                    break
        assert wanted in self.output, self.output

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        finally:
            os.close(self.master)


def test_on_a_terminal_the_command_gets_a_controlling_terminal(broker: Broker) -> None:
    # Opening /dev/tty succeeds only for a process that has a controlling terminal.
    term = Terminal(broker, "sh", "-c", "exec 3</dev/tty && echo ctty-ok; read line; echo $line")
    term.read_until(b"ctty-ok")
    term.type(b"typed\r")
    term.read_until(b"typed\r\ntyped\r\n")  # echoed by the terminal, then by the command
    assert term.wait() == 0


def test_on_a_terminal_ctrl_c_interrupts_the_command(broker: Broker) -> None:
    term = Terminal(broker, "sh", "-c", "echo started; exec sleep 30")
    term.read_until(b"started")
    term.type(b"\x03")
    assert term.wait() == -signal.SIGINT
