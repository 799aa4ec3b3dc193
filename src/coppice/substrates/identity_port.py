"""The host end of a VM's identity port (virtio-serial `coppice.identity`, a unix socket here).

The guest side is `coppice_agent.identity`. The host connects *before* the guest runs (before
`cont` on a clone, before the snapshot on the golden VM): with a host connected, the guest's
read() blocks instead of returning at once, so the restored guest thread is asleep in read()
and wakes on the first byte of its identity.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from typing import Any

from coppice.errors import SubstrateError


def identity_message(
    *,
    ip: str,
    prefixlen: int,
    gateway: str,
    mac: str,
    hostname: str,
    entry_id: str,
    ssh_host_key: bytes,
    now: float,
    seed: bytes,
) -> dict[str, Any]:
    return {
        "ip": f"{ipaddress.IPv4Address(ip)}/{prefixlen}",
        "gateway": gateway,
        "mac": mac,
        "hostname": hostname,
        "entry_id": entry_id,
        "time": now,
        "seed": seed.hex(),
        "ssh_host_key": ssh_host_key.decode(),
    }


def fresh_seed() -> bytes:
    return os.urandom(64)


class IdentityPort:
    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path
        self._pending = b""

    @classmethod
    def connect(cls, path: str, timeout_s: float = 10.0) -> IdentityPort:
        """Connect, retrying while QEMU is still creating the socket."""
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return cls(sock, path)
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise SubstrateError(f"cannot reach the identity port {path}: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def request(self, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send one line and return the guest's one-line answer."""
        self._sock.settimeout(timeout_s)
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
            deadline = time.monotonic() + timeout_s
            while b"\n" not in self._pending:
                self._sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise SubstrateError(f"the guest closed its identity port {self._path}")
                self._pending += chunk
        except TimeoutError as exc:
            raise SubstrateError(
                f"the guest did not answer on its identity port within {timeout_s:.0f} s"
            ) from exc
        except OSError as exc:
            raise SubstrateError(f"identity port {self._path}: {exc}") from exc
        line, self._pending = self._pending.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise SubstrateError(f"the guest answered {line[:80]!r} on its identity port") from exc
        if not isinstance(reply, dict):
            raise SubstrateError(f"the guest answered {reply!r} on its identity port")
        return reply

    def close(self) -> None:
        self._sock.close()
