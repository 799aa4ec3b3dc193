"""Writing a mounted filesystem's dirty data and metadata out to its device (syncfs(2)),
which Python's os module does not offer."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def syncfs(mount_point: Path) -> None:
    """Write out the filesystem mounted at `mount_point` (only that one, unlike sync(2)).
    Raises OSError."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(mount_point))
    finally:
        os.close(fd)
