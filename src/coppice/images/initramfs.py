"""The VM's initramfs: a gzip'd newc cpio archive written here, so no cpio binary is needed.

It holds a static busybox, the kernel modules needed to reach the root disk (in load
order, listed in /modules.order), and /init. Every timestamp is zero and inode numbers
follow the order of addition, so the same inputs give the same bytes.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
#: directories /init expects: mount points, and where busybox installs its applets
INITRAMFS_DIRS = ("bin", "dev", "lib", "lib/modules", "lower", "newroot", "proc", "rw", "sys")


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


@dataclass(frozen=True)
class ModuleFile:
    filename: str
    data: bytes


class NewcArchive:
    """Writes the "new ASCII" cpio format the kernel unpacks an initramfs from."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._next_inode = 1

    def _member(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._next_inode,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check: only the "070702" variant carries a checksum
        )
        self._next_inode += 1
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._parts += [header, encoded, _pad4(len(header) + len(encoded)), data, _pad4(len(data))]

    def directory(self, name: str, perms: int = 0o755) -> None:
        self._member(name, stat.S_IFDIR | perms)

    def file(self, name: str, data: bytes, perms: int = 0o644) -> None:
        self._member(name, stat.S_IFREG | perms, data)

    def symlink(self, name: str, target: str) -> None:
        self._member(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perms: int = 0o600) -> None:
        self._member(name, stat.S_IFCHR | perms, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive, closed with the trailer entry; the archive cannot grow after this."""
        self._member(TRAILER, 0)
        return b"".join(self._parts)


def build_initramfs(busybox: bytes, init_script: bytes, modules: list[ModuleFile]) -> bytes:
    """The gzip'd archive; `modules` must already be in load order."""
    archive = NewcArchive()
    for d in INITRAMFS_DIRS:
        archive.directory(d)
    # The kernel opens it as init's stdin/stdout before /init runs, ahead of devtmpfs.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox, 0o755)
    archive.file("init", init_script, 0o755)
    for m in modules:
        archive.file(f"lib/modules/{m.filename}", m.data)
    archive.file("modules.order", "".join(f"{m.filename}\n" for m in modules).encode())
    # mtime=0 keeps the gzip header, and so the whole image, reproducible.
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)
