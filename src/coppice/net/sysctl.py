"""Writing the host's network sysctls (`/proc/sys/net/...`), with an error that names them."""

from __future__ import annotations

from pathlib import Path

from coppice.errors import SubstrateError


def write(key: str, value: str) -> None:
    """`key` as a /proc/sys path, e.g. `net/ipv4/ip_forward`."""
    path = Path("/proc/sys") / key
    try:
        path.write_text(value)
    except OSError as exc:
        raise SubstrateError(f"cannot set {key.replace('/', '.')}={value}: {exc}") from exc
