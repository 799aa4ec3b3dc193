"""Loop devices: attach a file, detach a device, and which file backs which device.

All of it is ioctls and sysfs, no process: on the warm path, and with several spawns at
once, losetup(8) cost 2 ms per call and, when two of them picked the same free device,
slept 200 ms before trying again (eight spawns at once took 0.8 to 1.2 s to get their
devices). Here a device taken meanwhile is retried at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

SYS_BLOCK = Path("/sys/block")
LOOP_CONTROL = Path("/dev/loop-control")
LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
#: struct loop_config: fd, block_size, then struct loop_info64 (device, inode, rdevice,
#: offset, sizelimit; number, encrypt_type, encrypt_key_size, flags; file_name[64],
#: crypt_name[64], encrypt_key[32]; init[2]), then 8 reserved u64 (linux/loop.h)
_LOOP_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s 2Q 8Q")
#: what sysfs appends to a backing file's path once the file has been unlinked
DELETED_SUFFIX = " (deleted)"
_ATTEMPTS = 64


@contextlib.contextmanager
def attached(image: Path, direct_io: bool = True) -> Iterator[Path]:
    """A new loop device over `image`, detached by the kernel once its last user closes
    it (autoclear): mount it inside the `with` block, and the mount keeps it. With
    `direct_io` the device reads and writes the file with O_DIRECT, so its blocks are not
    cached a second time in the host's page cache (where the backing filesystem cannot,
    the device does buffered I/O). Raises OSError; ENODEV when no loop device is free."""
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(_ATTEMPTS):
            number = _free_device_number()
            device = Path(f"/dev/loop{number}")
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                if not _configure(fd, backing, image, direct_io):
                    continue  # another process took this device first; take the next one
                yield device
                return
            finally:
                os.close(fd)
        raise OSError(errno.EBUSY, f"no loop device stayed free for {image}")
    finally:
        os.close(backing)


def _free_device_number() -> int:
    try:
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise OSError(errno.ENODEV, f"no {LOOP_CONTROL}: `modprobe loop`") from exc
    try:
        return fcntl.ioctl(control, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise OSError(exc.errno, f"no free loop device: {exc.strerror}") from exc
    finally:
        os.close(control)


def _configure(fd: int, backing: int, image: Path, direct_io: bool) -> bool:
    """Bind `backing` to the device open as `fd`; False when the device was taken."""
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    name = os.fsencode(image)[:63]
    config = _LOOP_CONFIG.pack(
        backing, 0, 0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0, *([0] * 8)
    )
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, config)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        if exc.errno == errno.EINVAL and direct_io:
            return _configure(fd, backing, image, direct_io=False)
        raise OSError(exc.errno, f"cannot attach {image} to a loop device: {exc.strerror}") from exc
    return True


def detach(device: Path) -> None:
    """Detach `device`. One still held open (a lazily unmounted filesystem) is detached by
    the kernel when its last user lets go; one that is already free is left as it is."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: nothing attached
            raise OSError(exc.errno, f"cannot detach {device}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def backing_files() -> dict[Path, str]:
    """Every attached loop device and the path of its backing file, as the kernel reports
    it (with DELETED_SUFFIX once the file is unlinked)."""
    found: dict[Path, str] = {}
    for block in SYS_BLOCK.glob("loop*"):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            # Only attached devices have the file; one detached meanwhile has none.
            backing = (block / "loop" / "backing_file").read_text().rstrip("\n")
            found[Path("/dev") / block.name] = backing
    return found
