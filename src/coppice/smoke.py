"""The smoke rig: drives the whole lifecycle against a real pool and gates every step."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coppice.errors import CoppiceError
from coppice.images.keys import PoolKey
from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.substrates.base import SSH_PORT
from coppice.substrates.readiness import ssh_banner


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str


@dataclass
class SmokeReport:
    template: str
    pool_size: int
    warm_s: float = 0.0
    checkout_ms: float = 0.0
    ssh_ready_ms: float = 0.0
    py_result: str = ""
    gates: list[Gate] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.gates) and all(g.passed for g in self.gates)

    @property
    def failed_gate(self) -> Gate | None:
        return next((g for g in self.gates if not g.passed), None)


def ssh_command(key: PoolKey, ip: str, command: str, timeout_s: float = 30.0) -> str:
    """Run `command` in a sandbox over SSH with the pool key; returns its stdout."""
    done = subprocess.run(
        key.ssh_argv(ip, command, batch=True),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise CoppiceError(f"ssh root@{ip} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


class SmokeRig:
    def __init__(self, controller: PoolController, template: str, count: int) -> None:
        self.controller = controller
        self.template = template
        self.count = count
        self.key = PoolKey.at(controller.settings.keys_dir)
        self.report = SmokeReport(template, count)

    def gate(self, name: str, check: Callable[[], str]) -> bool:
        try:
            detail = check()
            self.report.gates.append(Gate(name, True, detail))
            return True
        except (CoppiceError, OSError, AssertionError, subprocess.SubprocessError) as exc:
            self.report.gates.append(Gate(name, False, f"{type(exc).__name__}: {exc}"))
            return False

    def run(self) -> SmokeReport:
        c = self.controller
        r = self.report
        state: dict[str, str] = {}

        def warm() -> str:
            c.drain(self.template)
            rep = c.warm(self.template, self.count)
            r.warm_s = rep.seconds
            assert not rep.failures, "; ".join(rep.failures)
            available = [e for e in c.list(self.template) if e.state is State.AVAILABLE]
            assert len(available) == self.count, f"{len(available)} available, not {self.count}"
            return f"{self.count} entries in {rep.seconds:.2f} s"

        def checkout() -> str:
            t0 = time.perf_counter()
            e = c.checkout(self.template)
            r.checkout_ms = (time.perf_counter() - t0) * 1000
            banner = ssh_banner(e.ip, SSH_PORT, timeout_s=5.0)
            r.ssh_ready_ms = (time.perf_counter() - t0) * 1000
            state.update(first=e.id, ip=e.ip)
            pid = e.pid
            return f"id={e.id} ip={e.ip} pid={pid}; {banner}"

        def python() -> str:
            out = ssh_command(self.key, state["ip"], "python3 -c 'print(1+1)'")
            r.py_result = out.strip()
            assert r.py_result == "2", f"printed {out!r}"
            return "python3 printed 2"

        def second() -> str:
            e = c.checkout(self.template)
            state["second"] = e.id
            assert e.id != state["first"], f"got {e.id} twice"
            return f"id={e.id} differs from {state['first']}"

        def give_back() -> str:
            fresh = c.return_entry(state["first"])
            assert fresh is not None, "no replacement was started"
            got = c.store.get(fresh.id)
            assert got.state is State.AVAILABLE, f"replacement is {got.state}"
            c.return_entry(state["second"])
            available = [e for e in c.list(self.template) if e.state is State.AVAILABLE]
            assert len(available) == self.count, f"{len(available)} available after returns"
            return f"{state['first']} replaced by {fresh.id}, available again"

        def drain() -> str:
            n = c.drain(self.template)
            left = c.list(self.template)
            assert not left, f"{len(left)} entries left"
            return f"{n} entries drained, list is empty"

        steps: list[tuple[str, Callable[[], str]]] = [
            ("warm", warm),
            ("checkout", checkout),
            ("ssh python", python),
            ("second checkout", second),
            ("return", give_back),
            ("drain", drain),
        ]
        for name, check in steps:
            if not self.gate(name, check):
                break
        if not r.passed:
            # Leave nothing half-used behind a failed run.
            with contextlib.suppress(CoppiceError):
                c.drain(self.template)
        return r
