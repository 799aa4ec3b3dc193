"""mount(2)/umount2(2) through libc, and the mount table, for per-entry root filesystems.

These run on the warm path for every entry; calling libc directly saves a process start per
mount compared with mount(8), and no maintained Python library wraps these two calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

MNT_DETACH = 2
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOATIME = 0x400
MS_BIND = 0x1000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str = "") -> None:
    """Raises OSError (errno set, ENOSPC when the host is out of room) on failure."""
    rc = _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags, data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount {fstype} on {target}: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Unmount; falls back to a lazy detach when something still holds the mount busy."""
    if _libc.umount2(str(target).encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err == 22:  # EINVAL: not a mount point (already unmounted)
        return
    if err == 16 and _libc.umount2(str(target).encode(), MNT_DETACH) == 0:  # EBUSY
        return
    if err == 2:  # ENOENT
        return
    raise OSError(err, f"cannot unmount {target}: {os.strerror(err)}")


def filesystem_at(target: Path) -> str | None:
    """The type of the filesystem mounted last at `target` (what a path lookup meets), or
    None when nothing is mounted there."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4].replace("\\040", " ") == str(target):
            # After the optional fields, " - " and then the filesystem type.
            found = fields[fields.index("-", 6) + 1]
    return found


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below `prefix`, deepest first (the order to unmount them in)."""
    found: list[Path] = []
    base = str(prefix).rstrip("/") + "/"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4].replace("\\040", " ")
        if point.startswith(base) or point == base.rstrip("/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
