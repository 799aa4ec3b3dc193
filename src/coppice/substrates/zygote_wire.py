"""The host's half of the zygote wire format (coppice_agent.zygote.wire is the zygote's):
one JSON object per SOCK_SEQPACKET datagram, the descriptors it names in its "fds" list as
SCM_RIGHTS. The host reads a forked entry's pid from the SCM_CREDENTIALS the kernel
attaches (translated into the host's pid namespace) on a socket with SO_PASSCRED."""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 65536
MAX_FDS = 64
_CREDS = struct.Struct("3i")


class ZygoteWireError(RuntimeError):
    pass


@dataclass(frozen=True)
class Message:
    body: dict[str, Any]
    fds: list[int]
    #: the sender's pid in the host's pid namespace, when the socket has SO_PASSCRED
    sender_pid: int | None


def send(sock: socket.socket, body: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds)))
    sock.sendmsg([data], ancillary)


def receive(sock: socket.socket, timeout_s: float) -> Message | None:
    """The next message within `timeout_s` (TimeoutError otherwise), None at end of stream."""
    ready, _, _ = select.select([sock], [], [], timeout_s)
    if not ready:
        raise TimeoutError(f"no answer within {timeout_s:.0f} s")
    data, ancdata, flags, _ = sock.recvmsg(
        MAX_MESSAGE,
        socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(_CREDS.size),
        socket.MSG_CMSG_CLOEXEC,
    )
    fds: list[int] = []
    pid: int | None = None
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
        elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _CREDS.unpack(payload[: _CREDS.size])[0]
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ZygoteWireError("message cut short")
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ZygoteWireError("a message is a JSON object")
    except (ValueError, ZygoteWireError) as exc:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise ZygoteWireError(str(exc)) from exc
    return Message(body, fds, pid)
