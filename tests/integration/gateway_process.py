"""`coppice serve` as a child process of the test session, on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.waiting import wait_until

API_KEY = "test-key"
#: a second tenant, to check that tenants do not see each other's sandboxes
OTHER_TENANT_KEY = "other-key"
KEYS = f"{API_KEY},other:{OTHER_TENANT_KEY}:create|read|manage"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class GatewayProcess:
    def __init__(self, env: dict[str, str], log: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "COPPICE_API_KEYS": KEYS, **settings}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 180.0) -> GatewayProcess:
        exe = shutil.which("coppice") or str(Path(__file__).parents[2] / ".venv/bin/coppice")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [exe, "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coppice serve exited {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"coppice serve did not come up:\n{self.tail()}")

    def stop(self) -> int:
        """SIGTERM, as a service manager would; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def sdk_env(self) -> dict[str, str]:
        return {
            "E2B_API_URL": self.url,
            "E2B_SANDBOX_URL": self.url,
            "E2B_API_KEY": API_KEY,
        }


def wait_for(predicate: Callable[[], object], timeout_s: float = 30.0) -> bool:
    return wait_until(predicate, timeout_s, interval=0.1)


def point_sdk_at(gateway: GatewayProcess) -> None:
    os.environ.pop("E2B_DEBUG", None)
    os.environ.pop("E2B_DOMAIN", None)
    os.environ.update(gateway.sdk_env())


@contextmanager
def sdk_pointed_at(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """The SDK's environment points at `gateway` while inside; afterwards the environment is
    as before and the gateway stopped."""
    saved = dict(os.environ)
    point_sdk_at(gateway)
    try:
        yield gateway
    finally:
        os.environ.clear()
        os.environ.update(saved)
        gateway.stop()


@contextmanager
def serving(
    env: dict[str, str],
    log: Path,
    pools: dict[str, int],
    drain: Callable[[str], object],
    **settings: str,
) -> Iterator[GatewayProcess]:
    """`coppice serve` keeping `pools` warm (template: entries), the SDK pointed at it while
    inside; the pools are drained (`drain`) before it starts and after it stopped."""
    for name in pools:
        drain(name)
    targets = ",".join(f"{name}={count}" for name, count in pools.items())
    gw = GatewayProcess(env, log, COPPICE_POOL_TARGETS=targets, **settings).start()
    try:
        with sdk_pointed_at(gw):
            yield gw
    finally:
        for name in pools:
            drain(name)


class RestartableGateway:
    """A gateway a test may stop, kill and start again on the same state, keeping `pools`
    (template: entries) warm; the SDK follows it to each new port."""

    def __init__(self, env: dict[str, str], log: Path, pools: dict[str, int]) -> None:
        self.env, self.log = env, log
        self.targets = ",".join(f"{name}={count}" for name, count in pools.items())
        self.current = self._start()

    def _start(self) -> GatewayProcess:
        gw = GatewayProcess(self.env, self.log, COPPICE_POOL_TARGETS=self.targets)
        gw.start(timeout_s=600)
        point_sdk_at(gw)
        return gw

    def stop(self) -> None:
        self.current.stop()

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does to the service, nothing cleaned up."""
        assert self.current.proc is not None
        self.current.proc.kill()
        self.current.proc.wait()

    def restart(self) -> None:
        self.current.stop()
        self.current = self._start()

    def start(self) -> None:
        self.current = self._start()


@contextmanager
def restartable(
    env: dict[str, str], log: Path, pools: dict[str, int], drain: Callable[[str], object]
) -> Iterator[RestartableGateway]:
    """A RestartableGateway keeping `pools` warm, the SDK pointed at whichever gateway runs;
    the pools drained before and after, and the environment restored."""
    for name in pools:
        drain(name)
    saved = dict(os.environ)
    gws = RestartableGateway(env, log, pools)
    try:
        yield gws
    finally:
        gws.stop()
        os.environ.clear()
        os.environ.update(saved)
        for name in pools:
            drain(name)
