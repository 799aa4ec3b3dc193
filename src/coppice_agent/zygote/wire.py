"""Messages between the host and a zygote, and between a forked entry and the host: one JSON
object per SOCK_SEQPACKET datagram, with the file descriptors it names riding along as
SCM_RIGHTS, in the order of its "fds" list. The host side (coppice.substrates.zygote_wire)
speaks the same format; a unit test holds the two to it."""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: one datagram: a request is a few hundred bytes of JSON
MAX_MESSAGE = 65536
MAX_FDS = 64
_INT = array.array("i").itemsize


class WireError(RuntimeError):
    """A message that is not one of ours (or is cut short)."""


def send(sock: socket.socket, body: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
    sock.sendmsg([data], ancillary)


def send_with_credentials(
    sock: socket.socket, body: dict[str, Any], pid: int, uid: int, gid: int
) -> None:
    """Send `body` with SCM_CREDENTIALS: the kernel checks them against the sender and
    translates the pid into the receiver's pid namespace, which is how the host learns a
    forked entry's pid as the host sees it."""
    data = json.dumps(body, separators=(",", ":")).encode()
    creds = struct.pack("3i", pid, uid, gid)
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)])


@dataclass(frozen=True)
class Received:
    body: dict[str, Any]
    fds: list[int]
    #: the sender's pid as this process's namespace sees it (SO_PASSCRED sockets only)
    sender_pid: int | None = None


def receive(sock: socket.socket) -> Received | None:
    """The next message, or None at end of stream. File descriptors are received
    close-on-exec; the caller owns them."""
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_MESSAGE,
        socket.CMSG_SPACE(MAX_FDS * _INT) + socket.CMSG_SPACE(struct.calcsize("3i")),
        socket.MSG_CMSG_CLOEXEC,
    )
    fds: list[int] = []
    pid: int | None = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - (len(payload) % _INT)])
            fds.extend(got)
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
    if not data and not fds:
        return None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            _close(fd)
        raise WireError("message cut short")
    try:
        body = json.loads(data)
    except ValueError as exc:
        for fd in fds:
            _close(fd)
        raise WireError(f"not JSON: {exc}") from exc
    if not isinstance(body, dict):
        for fd in fds:
            _close(fd)
        raise WireError("a message is a JSON object")
    return Received(body, fds, pid)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
