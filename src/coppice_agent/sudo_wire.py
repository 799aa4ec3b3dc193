"""The sudo broker's side of its conversation with the /usr/bin/sudo shim, on one unix stream
socket per `sudo`: JSON objects, one a line.

  shim → broker   {"args": [...], "cwd": ..., "env": {...}}   with its fds 0, 1, 2 attached
  broker → shim   {"started": true, "pty": bool}              with the new terminal's master
                                                              attached when `pty` is true
  shim → broker   {"signal": N}                               any number, while it runs
  broker → shim   {"exit": N} or {"signal": N}, optionally with "stdout"/"stderr" text to print

The shim (src/coppice/guest/sudo.py) speaks the other side; it cannot import this module, so
a change here is a change there too."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

from coppice_agent.readiness import readable, writable

#: generous for argv plus environment (Linux caps both together at a few MiB)
MAX_REQUEST = 4 * 1024 * 1024
STDIO_FDS = 3
_CHUNK = 64 * 1024


class ClientGone(ConnectionError):
    """The shim closed its end (it exited, or was killed)."""


class BadRequest(ValueError):
    """What arrived is not a request the shim sends."""


def peer_uid(sock: socket.socket) -> int:
    """The connecting process's effective uid, as the kernel recorded it at connect(): the
    only identity the broker trusts. (Anything in the request is the caller's say-so.)"""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class SudoChannel:
    """One connection, non-blocking, driven from the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = bytearray()

    async def read_request(self) -> tuple[dict[str, Any], list[int]]:
        """The request line and the descriptors sent with it. The caller owns (and must
        close) the descriptors, even when this raises after receiving them."""
        fds: list[int] = []
        try:
            while b"\n" not in self._buffer:
                if len(self._buffer) > MAX_REQUEST:
                    raise BadRequest("request too large")
                data, received = await self._recv_with_fds()
                fds += received
                if not data:
                    raise ClientGone("closed before sending a request")
                self._buffer += data
            return _decode(self._take_line()), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Every later message, until the shim closes its end."""
        loop = asyncio.get_running_loop()
        while True:
            while b"\n" in self._buffer:
                yield _decode(self._take_line())
            if len(self._buffer) > _CHUNK:
                raise BadRequest("message too large")
            data = await loop.sock_recv(self.sock, _CHUNK)
            if not data:
                return
            self._buffer += data

    async def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message).encode() + b"\n"
        loop = asyncio.get_running_loop()
        if not fds:
            await loop.sock_sendall(self.sock, data)
            return
        while True:
            try:
                sent = socket.send_fds(self.sock, [data], list(fds))
                break
            except BlockingIOError:
                await writable(self.sock.fileno())
        # The descriptors travel with the first byte; the rest of the line is plain data.
        if sent < len(data):
            await loop.sock_sendall(self.sock, data[sent:])

    async def _recv_with_fds(self) -> tuple[bytes, list[int]]:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.sock, _CHUNK, STDIO_FDS, socket.MSG_CMSG_CLOEXEC
                )
                return data, fds
            except BlockingIOError:
                await readable(self.sock.fileno())

    def _take_line(self) -> bytes:
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line


def _decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        raise BadRequest("not JSON") from None
    if not isinstance(message, dict):
        raise BadRequest("not a JSON object")
    return message
