"""Freezing a mounted filesystem (FIFREEZE/FITHAW): its dirty data and journal written out
and new writes held, so a copy of the device underneath is a clean filesystem."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

#: _IOWR('X', 119, int) and _IOWR('X', 120, int) from linux/fs.h
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


@contextlib.contextmanager
def frozen(mount_point: Path) -> Iterator[None]:
    """The filesystem mounted at `mount_point`, frozen while inside. Raises OSError."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
        try:
            yield
        finally:
            fcntl.ioctl(fd, FITHAW, 0)
    finally:
        os.close(fd)


def thaw(mount_point: Path) -> bool:
    """Thaw the filesystem at `mount_point` if a freeze is on it (one whose holder died: a
    freeze outlives the process that took it, and an unmount, which leaves the superblock
    frozen and its loop device held). Returns whether it was frozen. Raises OSError."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not frozen
            return False
        raise
    finally:
        os.close(fd)
    return True
