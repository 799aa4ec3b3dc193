"""`coppice serve` on a free loopback port, for the benchmarks that drive it with the SDK."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_gateway(log: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start it with `env` over this process's environment; wait until /health answers."""
    port = free_port()
    exe = str(Path(sys.executable).with_name("coppice"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "serve", "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"coppice serve exited; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    stop_gateway(proc)
    raise SystemExit(f"coppice serve did not come up; see {log}")


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
