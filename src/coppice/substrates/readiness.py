"""Probes that tell whether a sandbox answers: its SSH banner and its agent's /health, /ready."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from coppice.errors import SandboxDied, SandboxNotReady


def ssh_banner(ip: str, port: int = 22, timeout_s: float = 1.0) -> str:
    with socket.create_connection((ip, port), timeout=timeout_s) as s:
        data = b""
        while b"\n" not in data:
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
    if not line.startswith("SSH-"):
        raise ConnectionError(f"not an SSH banner: {line!r}")
    return line


def agent_health(ip: str, port: int, timeout_s: float = 1.0, path: str = "/health") -> int:
    """GET `path` over a fresh connection; returns the 2xx status, raises on anything else.

    `/health` says the agent is up; `/ready` says it is warm (its kernel answers), which is
    what a warm must wait for so that the first call after checkout pays no start-up.
    """
    with socket.create_connection((ip, port), timeout=timeout_s) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    status = data.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or not status[1].startswith(b"2"):
        raise ConnectionError(f"agent answered {data[:80]!r} to {path}")
    return int(status[1])


def wait_until_answering(
    entry_id: str,
    ip: str,
    agent_port: int,
    ssh_port: int,
    timeout_s: float,
    is_alive: Callable[[], bool],
    diagnostics: Callable[[], str],
) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    agent_ok = ssh_ok = False
    last_error = ""
    while True:
        try:
            if not agent_ok:
                agent_health(ip, agent_port, timeout_s=0.5, path="/ready")
                agent_ok = True
            if not ssh_ok:
                ssh_banner(ip, ssh_port, timeout_s=0.5)
                ssh_ok = True
            return
        except OSError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if not is_alive():
            raise SandboxDied(entry_id, f"exited while starting; {diagnostics()}")
        if time.monotonic() > deadline:
            raise SandboxNotReady(
                f"sandbox {entry_id} did not answer within {timeout_s:.0f} s "
                f"(agent {'ok' if agent_ok else 'silent'}, ssh {'ok' if ssh_ok else 'silent'};"
                f" last error {last_error}); {diagnostics()}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)
