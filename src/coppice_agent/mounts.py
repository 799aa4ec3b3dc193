"""Which filesystem a path lives on, read from /proc/self/mountinfo, and whether a directory
watch there can be trusted (envd 0.6.4 refuses network mounts unless asked not to).

inotify only sees changes made through this kernel's own mount. On a filesystem whose files
another machine (or the VM host) can change, those changes raise no event at all, so such
watches look fine and silently miss things."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"

# Network filesystems, plus the host-to-guest shares (9p, virtiofs), which fail the same way:
# whoever writes on the far side produces no inotify event here. FUSE (`fuse`, `fuseblk`,
# `fuse.<driver>`) counts too, as the SDK documents: sshfs, s3fs, rclone and the like are
# network filesystems behind it, and we cannot tell which ones are not.
_NETWORK_TYPES = frozenset(
    {
        "9p",
        "afs",
        "ceph",
        "cifs",
        "coda",
        "davfs",
        "fuse",
        "fuseblk",
        "glusterfs",
        "gpfs",
        "lustre",
        "ncpfs",
        "nfs",
        "nfs4",
        "smb3",
        "smbfs",
        "virtiofs",
    }
)
# The kernel writes space, tab, newline and backslash in mount points as octal escapes.
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in mountinfo `text` (proc(5)), in the order listed; lines that do not
    parse are skipped."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        # Field 5 is the mount point; after the optional fields, "-" and then the type.
        try:
            separator = fields.index("-", 6)
            fstype = fields[separator + 1]
        except (ValueError, IndexError):
            continue
        mount_point = _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        mounts.append(Mount(mount_point, fstype))
    return mounts


def filesystem_type(mounts: list[Mount], path: str) -> str | None:
    """The type of the filesystem `path` (absolute, symlinks resolved) is on: the mount with
    the longest mount point containing it, the last listed winning among mounts stacked on
    one point, since that one is on top."""
    best: Mount | None = None
    for mount in mounts:
        if _contains(mount.mount_point, path) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    return None if best is None else best.fstype


def _contains(mount_point: str, path: str) -> bool:
    if mount_point == "/":
        return path.startswith("/")
    return path == mount_point or path.startswith(mount_point + "/")


def is_network_filesystem(fstype: str) -> bool:
    return fstype in _NETWORK_TYPES or fstype.startswith("fuse.")


def network_filesystem_of(path: str, mountinfo: str = MOUNTINFO) -> str | None:
    """The network filesystem type `path` is on, or None if it is local (or unknown)."""
    try:
        with open(mountinfo, "rb") as source:
            # fsdecode: mount points are bytes; decoded like os.path's strings, they compare.
            text = os.fsdecode(source.read())
    except OSError:
        # No /proc to ask: watch as before envd 0.6.4 rather than refuse every watch.
        return None
    fstype = filesystem_type(parse_mountinfo(text), os.path.realpath(path))
    if fstype is not None and is_network_filesystem(fstype):
        return fstype
    return None
