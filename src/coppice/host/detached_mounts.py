"""Detached mount trees (open_tree(2) with OPEN_TREE_CLONE): a copy of a mount, held by a
file descriptor and attached to no namespace, that a process in another mount namespace
can attach with move_mount(2) once it receives the descriptor. This is how a zygote's fork
gets the entry's overlay (mounted here, in the host's namespace) as its root without the
zygote seeing any host path. Through libc's syscall(2): Python has no wrapper; x86_64."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
_AT_FDCWD = -100
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def clone_tree(path: Path, attributes: int = 0) -> int:
    """A detached copy of the mount tree at `path` (recursively), with `attributes`
    (MOUNT_ATTR_*) set on all of it. The caller owns the descriptor."""
    fd = _libc.syscall(
        _SYS_OPEN_TREE,
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(str(path).encode()),
        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
    )
    if fd < 0:
        raise _fail(f"open_tree {path}")
    if attributes:
        attr = _MountAttr(attributes, 0, 0, 0)
        rc = _libc.syscall(
            _SYS_MOUNT_SETATTR,
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if rc < 0:
            error = _fail(f"mount_setattr {path}")
            os.close(fd)
            raise error
    return int(fd)
