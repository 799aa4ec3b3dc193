"""The sudo broker: runs commands as another account for the accounts sudoers lets do so,
for the /usr/bin/sudo shim of every template.

In a jail every process runs with no_new_privs (bubblewrap sets it, and it cannot be
cleared), so a setuid sudo cannot raise its privileges. The agent already runs as the
sandbox's root, so it does the switch instead: the shim connects to this socket, the kernel
says which uid it runs as (SO_PEERCRED), sudoers says whether that account may, and the agent
starts the command as the target account on the shim's own stdin, stdout and stderr (passed
over the socket), forwards the signals the shim reports, and reports the exit.

The socket is open to every account (0666): who is served is decided per connection, by
uid, and an account sudoers does not name gets sudo's refusal and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from coppice_agent.readiness import readable
from coppice_agent.sudo_plan import Answer, Launch, LookupUser, SudoRequest, plan
from coppice_agent.sudo_spawn import SudoChild, start_child
from coppice_agent.sudo_wire import BadRequest, ClientGone, SudoChannel, peer_uid
from coppice_agent.sudoers import SudoersFiles, grant_for
from coppice_agent.users import SandboxUser, UnknownUser

log = logging.getLogger("coppice_agent.sudo")

DEFAULT_SOCKET = "/run/coppice/sudo.sock"
#: where the broker listens and the shim connects, when not the default (tests)
SOCKET_ENV = "COPPICE_SUDO_SOCKET"
# A connection that has not sent its request by then is dropped: the socket is open to
# every account, and idle connections must not pile up.
_REQUEST_TIMEOUT = 10.0
# After the shim vanishes (killed, say by SIGKILL to its process group), its command gets a
# hangup, as a closed terminal would give it, then this long before SIGKILL.
_HANGUP_GRACE = 2.0
#: what the shim may ask to have delivered to its command's process group: what it relays
FORWARDABLE = frozenset(
    {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
)


async def serve_sudo(
    socket_path: str | None = None,
    *,
    sudoers: SudoersFiles | None = None,
    lookup_user: LookupUser = SandboxUser.lookup,
) -> None:
    """Serve until cancelled; on cancellation, stop listening and kill what still runs.

    A socket that cannot be made is logged and ends this quietly: the agent's other
    services do not depend on it, and the shim then says the broker is not running."""
    path = Path(socket_path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)
    try:
        listener = _listen(path)
    except OSError as exc:
        log.error("the sudo broker cannot listen on %s: %s", path, exc)
        return
    broker = SudoBroker(sudoers or SudoersFiles(), lookup_user)
    log.info("sudo broker listening on %s", path)
    try:
        await broker.serve(listener)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            path.unlink()
        await broker.aclose()


def _listen(path: Path) -> socket.socket:
    """Bound under a temporary name and renamed into place once open to everyone, so a
    client never finds the socket with the wrong mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(staging))
        staging.chmod(0o666)
        sock.listen(64)
        staging.replace(path)
    except BaseException:
        sock.close()
        staging.unlink(missing_ok=True)
        raise
    sock.setblocking(False)
    return sock


class SudoBroker:
    def __init__(self, sudoers: SudoersFiles, lookup_user: LookupUser) -> None:
        self.sudoers = sudoers
        self.lookup_user = lookup_user
        self._sessions: set[asyncio.Task[None]] = set()

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # Out of descriptors, typically: wait for sessions to end rather than spin.
                log.warning("sudo broker cannot accept a connection: %s", exc)
                await asyncio.sleep(0.5)
                continue
            task = asyncio.create_task(self._session(conn))
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

    async def aclose(self) -> None:
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _session(self, conn: socket.socket) -> None:
        with conn:
            channel = SudoChannel(conn)
            try:
                started = await self._start(channel)
                if started is not None:
                    await self._supervise(channel, *started)
            except (ClientGone, BadRequest, TimeoutError, ConnectionError) as exc:
                log.debug("sudo connection dropped: %s", exc)
            except Exception:
                log.exception("sudo broker failed a request")

    async def _start(self, channel: SudoChannel) -> tuple[SudoChild, Launch] | None:
        """Answer the request, or start its command; None when there is nothing to watch."""
        uid = peer_uid(channel.sock)
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            message, fds = await channel.read_request()
        try:
            caller, outcome = self._decide(uid, _request_from(message))
        except BaseException:
            _close_all(fds)
            raise
        if isinstance(outcome, Answer):
            _close_all(fds)
            await channel.send(_answer_message(outcome))
            return None
        # Only now, for an approved request, is anything done with the caller's fds.
        if len(fds) != 3:
            _close_all(fds)
            raise BadRequest(f"expected stdin, stdout and stderr, got {len(fds)} fds")
        try:
            child = await _spawn(outcome, fds)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            failed = Answer(1, stderr=f"sudo: unable to execute {outcome.executable}: {reason}\n")
            await channel.send(_answer_message(failed))
            return None
        # The record sudo would write to syslog, in the sandbox's log.
        log.info(
            "sudo: %s : PWD=%s ; USER=%s ; COMMAND=%s",
            caller,
            outcome.cwd,
            outcome.user.name,
            outcome.command_line,
        )
        return child, outcome

    def _decide(self, uid: int, request: SudoRequest) -> tuple[str, Answer | Launch]:
        """The caller's name (for the log) and what to do for it."""
        try:
            caller = self.lookup_user(pwd.getpwuid(uid).pw_name)
        except (KeyError, UnknownUser):
            return f"#{uid}", Answer(1, stderr="sudo: you do not exist in the passwd database\n")
        outcome = plan(
            request,
            caller,
            grant_for(caller, self.sudoers),
            hostname=socket.gethostname(),
            lookup_user=self.lookup_user,
        )
        if isinstance(outcome, Answer) and outcome.status != 0:
            log.info("sudo: %s : %s", caller.name, outcome.stderr.strip().partition("\n")[0])
        return caller.name, outcome

    async def _supervise(self, channel: SudoChannel, child: SudoChild, launch: Launch) -> None:
        """Until the command exits: deliver the signals the shim forwards, and when the shim
        goes away, hang its command up. Then report how it ended."""
        try:
            master = [child.pty_master] if child.pty_master is not None else []
            try:
                await channel.send({"started": True, "pty": bool(master)}, fds=master)
            finally:
                # The shim holds the only copy now: when it exits, the terminal hangs up.
                for fd in master:
                    os.close(fd)
        except ConnectionError:
            pass  # the shim is gone already; following it below notices
        exited = asyncio.create_task(_wait_exit(child.popen))
        following = asyncio.create_task(_follow(channel, child))
        try:
            await asyncio.wait({exited, following}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                _signal_group(child, signal.SIGHUP)
                _signal_group(child, signal.SIGCONT)
                await asyncio.wait({exited}, timeout=_HANGUP_GRACE)
                if not exited.done():
                    _signal_group(child, signal.SIGKILL)
            returncode = await exited
        finally:
            following.cancel()
            if not exited.done():
                # Cancelled (the agent is stopping): the command does not outlive it.
                exited.cancel()
                _kill_and_reap(child)
        status: dict[str, Any] = (
            {"exit": returncode} if returncode >= 0 else {"signal": -returncode}
        )
        with contextlib.suppress(ConnectionError):
            await channel.send(status)
        log.debug("sudo: %s ended: %s", launch.command_line, status)


def _request_from(message: dict[str, Any]) -> SudoRequest:
    args, cwd, env = message.get("args"), message.get("cwd"), message.get("env")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise BadRequest("args must be a list of strings")
    if cwd is not None and not isinstance(cwd, str):
        raise BadRequest("cwd must be a string")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise BadRequest("env must map strings to strings")
    return SudoRequest(args=args, cwd=cwd, env=env)


async def _spawn(launch: Launch, fds: list[int]) -> SudoChild:
    """Fork and exec in a worker thread, which owns `fds` from here on and closes them once
    the child has its copies. Cancelled meanwhile (the agent is stopping), the thread still
    finishes, and what it started is killed: nothing runs that nobody supervises."""

    def start_and_close() -> SudoChild:
        try:
            return start_child(launch, fds)
        finally:
            _close_all(fds)

    spawning = asyncio.ensure_future(asyncio.to_thread(start_and_close))
    try:
        return await asyncio.shield(spawning)
    except asyncio.CancelledError:
        spawning.add_done_callback(_kill_orphan)
        raise


def _kill_orphan(spawning: asyncio.Future[SudoChild]) -> None:
    if spawning.cancelled() or spawning.exception() is not None:
        return
    child = spawning.result()
    if child.pty_master is not None:
        os.close(child.pty_master)
    _kill_and_reap(child)


def _kill_and_reap(child: SudoChild) -> None:
    _signal_group(child, signal.SIGKILL)
    # Reaped off the loop: the loop may be closing, and the exit is moments away.
    threading.Thread(target=child.popen.wait, daemon=True).start()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _answer_message(answer: Answer) -> dict[str, Any]:
    return {"exit": answer.status, "stdout": answer.stdout, "stderr": answer.stderr}


async def _follow(channel: SudoChannel, child: SudoChild) -> None:
    """Deliver each signal the shim forwards; return when the shim has gone."""
    with contextlib.suppress(ConnectionError, BadRequest):
        async for message in channel.messages():
            signum = message.get("signal")
            if isinstance(signum, int) and signum in FORWARDABLE:
                _signal_group(child, signum)


def _signal_group(child: SudoChild, signum: int) -> None:
    if child.popen.returncode is not None:
        return  # reaped: its pid may already be someone else's
    try:
        os.killpg(child.popen.pid, signum)
    except ProcessLookupError:
        # Not (or no longer) a group leader: setsid(1) between exec and setsid(), or the
        # command has since exited; signal the process alone, if it is still there.
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.popen.pid, signum)


async def _wait_exit(popen: subprocess.Popen[bytes]) -> int:
    """Wait for the exit without a blocked thread (pidfd; every kernel Coppice runs on has
    it), then reap."""
    pidfd = os.pidfd_open(popen.pid)
    try:
        await readable(pidfd)
    finally:
        os.close(pidfd)
    returncode = popen.poll()
    return int(returncode if returncode is not None else popen.wait())
