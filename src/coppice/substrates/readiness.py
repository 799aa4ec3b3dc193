"""Probes that tell whether a sandbox answers: its SSH banner and its agent's /health, /ready."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from coppice.errors import SandboxDied, SandboxNotReady

#: what the agent's /ready answers once the template's start has failed for good (its start
#: command exited with an error, or its ready command ran out of time); 503 means "not yet"
READY_FAILED_STATUS = 500
#: a readiness probe's first time limit, doubled after each probe that runs out of it (up
#: to the last): 30 warms of `base` with 0.5 s each saw 9 probes wait out the 0.5 s for a
#: SYN dropped while the sandbox's network came up
FIRST_PROBE_TIMEOUT_S = 0.1
LAST_PROBE_TIMEOUT_S = 2.0
#: enough for the agent's reason and the start command's last lines
_MAX_FAILURE_BYTES = 64 * 1024


class AgentStartFailed(Exception):
    """The agent answered that it will never be ready; the message is its reason. Not an
    OSError: waiting longer cannot help."""


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
    """GET `path` over a fresh connection; returns the 2xx status. Raises AgentStartFailed
    with the agent's reason on READY_FAILED_STATUS, ConnectionError on any other answer.

    `/health` says the agent is up; `/ready` says it is warm (its kernel answers and the
    template's ready command has passed), which is what a warm must wait for so that the
    first call after checkout pays no start-up.
    """
    with socket.create_connection((ip, port), timeout=timeout_s) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n".encode())
        data = _receive_until(s, lambda got: b"\r\n" in got)
        status = data.split(b"\r\n", 1)[0].split()
        if len(status) >= 2 and status[1] == str(READY_FAILED_STATUS).encode():
            # Only now is the body worth reading: the agent closes after it (Connection: close).
            data = _receive_until(s, lambda _: False, data)
            raise AgentStartFailed(_failure_reason(data))
    if len(status) < 2 or not status[1].startswith(b"2"):
        raise ConnectionError(f"agent answered {data[:80]!r} to {path}")
    return int(status[1])


def _receive_until(s: socket.socket, enough: Callable[[bytes], bool], data: bytes = b"") -> bytes:
    """Read until `enough(data)`, the peer closes, or the size cap."""
    while not enough(data) and len(data) < _MAX_FAILURE_BYTES:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _failure_reason(response: bytes) -> str:
    """The agent's `message` from a JSON error body, else the body as text."""
    body = response.partition(b"\r\n\r\n")[2]
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str) and message:
        return message
    return body.decode(errors="replace").strip() or "no reason given"


def wait_until_answering(
    entry_id: str,
    ip: str,
    agent_port: int,
    ssh_port: int,
    timeout_s: float,
    is_alive: Callable[[], bool],
    diagnostics: Callable[[], str],
) -> None:
    """Retry until the agent is ready and SSH answers; anything short of an answer (refused,
    silent, 503) is "not yet" until `timeout_s`. The agent saying its start failed ends the
    wait at once, with its reason."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    probe_s = FIRST_PROBE_TIMEOUT_S
    agent_ok = ssh_ok = False
    last_error = ""
    while True:
        try:
            if not agent_ok:
                agent_health(ip, agent_port, timeout_s=probe_s, path="/ready")
                agent_ok = True
            if not ssh_ok:
                ssh_banner(ip, ssh_port, timeout_s=probe_s)
                ssh_ok = True
            return
        except AgentStartFailed as exc:
            raise SandboxNotReady(f"sandbox {entry_id} did not start: {exc}") from None
        except TimeoutError as exc:
            # A SYN lost while the sandbox's network comes up is sent again by TCP only a
            # second later; a new connection sends one now. A guest too slow to answer in
            # time (TCG) gets longer on each try.
            last_error = f"{type(exc).__name__}: {exc}"
            probe_s = min(probe_s * 2, LAST_PROBE_TIMEOUT_S)
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
