"""The template's start command and its ready check, run once when the agent starts: for a
warm pool entry that is before the entry is frozen, so a sandbox handed out finds its start
command already running and ready, as an E2B sandbox does.

The start command is one of envd's own processes (`ProcessService.launch`), so
`commands.list()` shows it and `commands.connect()` follows it. It runs as the sandbox's
default user (the template's), in its default cwd, with its env vars, through `bash -l -c`
as E2B starts it. The ready command runs the same way but through `/bin/sh -c`, and not as a
listed process, every RETRY_INTERVAL_S until it exits 0. What `/ready` answers follows:

- passed: the ready command exited 0, and the start command had not failed by then;
- failed: the start command exited with an error first, or the ready command did not pass
  within the template's ready timeout. The reason says which, with the last lines the start
  command printed, and goes to the agent's log too (the host serves it as the sandbox's).

A start command that exits 0 has not failed (`redis-server --daemonize yes`, or E2B's own
example `echo $HELLO` with `wait_for_timeout`): the ready command still decides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

from coppice_agent.environment import SandboxEnvironment
from coppice_agent.output_tail import OutputTail
from coppice_agent.paths import default_cwd
from coppice_agent.processes import ProcessService
from coppice_agent.rpc.process.process_pb import ProcessConfig, ProcessEvent
from coppice_agent.spawn import NoControllingTerminal, SpawnSpec
from coppice_agent.started_process import StartedProcess
from coppice_agent.template_config import TemplateConfig
from coppice_agent.users import SandboxUser, UnknownUser

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 0.2
#: how much of the start command's output a failure carries
TAIL_LINES = 30
#: how much of the last ready attempt's output a timeout carries
ATTEMPT_TAIL_LINES = 5
#: E2B's ready command for a start command that names none: give it 20 s
DEFAULT_READY_CMD = "sleep 20"
_BASH = "/bin/bash"
_SH = "/bin/sh"


class StartupFailed(Exception):
    """The template's start did not become ready; the message says why."""


@dataclass(frozen=True)
class _Attempt:
    passed: bool
    #: how it ended and what it printed last, for a timeout's message
    report: str


class TemplateStartup:
    """`run()` is the whole start-up, once; `passed` and `failure` are its verdict."""

    def __init__(
        self,
        config: TemplateConfig,
        env: SandboxEnvironment,
        processes: ProcessService,
        *,
        retry_interval: float = RETRY_INTERVAL_S,
    ) -> None:
        self._config = config
        self._env = env
        self._processes = processes
        self._retry_interval = retry_interval
        self._start_tail = OutputTail(TAIL_LINES)
        self.passed = False
        #: why the start-up failed, or None while it has not
        self.failure: str | None = None

    @property
    def ready_cmd(self) -> str | None:
        if self._config.ready_cmd is not None:
            return self._config.ready_cmd
        return DEFAULT_READY_CMD if self._config.start_cmd is not None else None

    def waiting_for(self) -> str:
        return f"waiting for the template's ready command {self.ready_cmd!r} to pass"

    async def run(self) -> None:
        if self.ready_cmd is None:
            self.passed = True
            return
        log.info(
            "template start: start command %r, ready command %r, %g s to pass",
            self._config.start_cmd,
            self.ready_cmd,
            self._config.ready_timeout_s,
        )
        try:
            await self._run(self.ready_cmd)
        except StartupFailed as exc:
            self.failure = str(exc)
            log.error("the template did not become ready: %s", self.failure)
            return
        except Exception as exc:
            # A bug here must not leave /ready answering "not yet" until the host gives up.
            log.exception("the template's start crashed")
            self.failure = f"the agent's template start crashed: {exc!r}"
            return
        self.passed = True
        log.info("the template's ready command passed")

    async def _run(self, ready_cmd: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.ready_timeout_s
        user = await self._user()
        cwd = await asyncio.to_thread(default_cwd, self._env, user)
        env = self._env.process_env(user)
        ended: asyncio.Future[ProcessEvent.EndEvent] = loop.create_future()
        follower: asyncio.Task[None] | None = None
        if self._config.start_cmd is not None:
            follower = await self._start(self._config.start_cmd, user, cwd, env, ended)
        check = SpawnSpec([_SH, "-c", ready_cmd], env, cwd, user, pty=None, with_stdin=False)
        ready = asyncio.create_task(self._until_ready(check, ready_cmd, deadline))
        try:
            waiters: set[asyncio.Future[Any]] = {ready, ended}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if _failed(ended):
                raise self._start_failed(ended.result(), ready_cmd)
            # Still running, or exited 0 (it may have daemonised): the ready command decides.
            await ready
            if _failed(ended):
                raise self._start_failed(ended.result(), ready_cmd)
        finally:
            # The start command's output is nobody's once there is a verdict; it runs on.
            tasks = [ready] if follower is None else [ready, follower]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _user(self) -> SandboxUser:
        try:
            return await asyncio.to_thread(self._env.user)
        except UnknownUser as exc:
            raise StartupFailed(f"the template's user cannot run its commands: {exc}") from None

    async def _start(
        self,
        command: str,
        user: SandboxUser,
        cwd: str,
        env: dict[str, str],
        ended: asyncio.Future[ProcessEvent.EndEvent],
    ) -> asyncio.Task[None]:
        """Start the start command as a listed process; returns the task that follows its
        output into the tail and settles `ended` with its end."""
        shell = _BASH if os.access(_BASH, os.X_OK) else _SH
        argv = [shell, "-l", "-c", command]
        config = ProcessConfig(
            cmd=argv[0], args=argv[1:], envs=dict(self._env.template_envs), cwd=cwd
        )
        spec = SpawnSpec(argv, env, cwd, user, pty=None, with_stdin=False)
        try:
            proc, queue = await self._processes.launch(spec, config)
        except (NoControllingTerminal, OSError) as exc:
            raise StartupFailed(f"cannot run the start command {command!r}: {exc}") from None
        log.info("the start command runs as pid %d", proc.pid)
        return asyncio.create_task(self._follow(proc, queue, ended))

    async def _follow(
        self,
        proc: StartedProcess,
        queue: asyncio.Queue[ProcessEvent],
        ended: asyncio.Future[ProcessEvent.EndEvent],
    ) -> None:
        try:
            while True:
                choice = (await queue.get()).event
                if choice is None:
                    continue
                if choice.field == "data":
                    output = choice.value.output
                    if output is not None:
                        self._start_tail.feed(output.field, output.value)
                elif choice.field == "end":
                    ended.set_result(choice.value)
                    return
        finally:
            proc.events.unfollow(queue)

    async def _until_ready(self, spec: SpawnSpec, ready_cmd: str, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            attempt = await self._attempt(spec, ready_cmd, deadline)
            if attempt.passed:
                return
            if loop.time() >= deadline:
                raise StartupFailed(
                    f"the ready command {ready_cmd!r} did not pass within "
                    f"{self._config.ready_timeout_s:g} s (its last attempt: {attempt.report})"
                    + self._start_output()
                )
            await asyncio.sleep(min(self._retry_interval, max(deadline - loop.time(), 0)))

    async def _attempt(self, spec: SpawnSpec, ready_cmd: str, deadline: float) -> _Attempt:
        """One run of the ready command. Its only time limit is the deadline itself, not a
        share of it: E2B's `wait_for_timeout(ms)` is `sleep N`, which must get to pass."""
        try:
            child = await asyncio.to_thread(spec.spawn)
        except OSError as exc:
            raise StartupFailed(f"cannot run the ready command {ready_cmd!r}: {exc}") from None
        proc = StartedProcess(child, ProcessConfig(cmd=spec.argv[0], args=spec.argv[1:]), None)
        queue = proc.events.follow()
        proc.kill_at(deadline)
        runner = asyncio.create_task(proc.run())
        tail = OutputTail(ATTEMPT_TAIL_LINES)
        end: ProcessEvent.EndEvent | None = None
        try:
            while end is None:
                choice = (await queue.get()).event
                if choice is None:
                    continue
                if choice.field == "data" and choice.value.output is not None:
                    tail.feed(choice.value.output.field, choice.value.output.value)
                elif choice.field == "end":
                    end = choice.value
        finally:
            # Cancelled (a failed start command, the agent stopping): never leave it behind.
            if end is None:
                proc.kill_group(signal.SIGKILL)
            await asyncio.gather(runner, return_exceptions=True)
        if end.exited and end.exit_code == 0:
            return _Attempt(True, "exit status 0")
        how = "killed at the deadline" if proc.timed_out else end.status
        said = tail.text()
        return _Attempt(False, f"{how}, printing {said!r}" if said else f"{how}, printing nothing")

    def _start_failed(self, end: ProcessEvent.EndEvent, ready_cmd: str) -> StartupFailed:
        return StartupFailed(
            f"the start command {self._config.start_cmd!r} ended ({end.status}) before the "
            f"ready command {ready_cmd!r} passed" + self._start_output()
        )

    def _start_output(self) -> str:
        if self._config.start_cmd is None:
            return ""
        lines = self._start_tail.lines()
        if not lines:
            return "; the start command printed nothing"
        return f"; the start command's last {len(lines)} lines of output:\n" + "\n".join(lines)


def _failed(ended: asyncio.Future[ProcessEvent.EndEvent]) -> bool:
    if not ended.done():
        return False
    end = ended.result()
    return not (end.exited and end.exit_code == 0)
