"""Loop devices: attach a file, detach a device, and which file backs which device.

Attaching goes through losetup(8): it finds a free device and configures it in one
LOOP_CONFIGURE call, retrying when another process takes the same device meanwhile.
Detaching is a single ioctl, and the table of backing files is read from sysfs; neither
needs a process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import subprocess
from pathlib import Path

SYS_BLOCK = Path("/sys/block")
LOOP_CLR_FD = 0x4C01
#: what sysfs appends to a backing file's path once the file has been unlinked
DELETED_SUFFIX = " (deleted)"


def attach(image: Path, direct_io: bool = True) -> Path:
    """A new loop device over `image`. With `direct_io` the device reads and writes the
    file with O_DIRECT, so its blocks are not cached a second time in the host's page
    cache. Raises OSError: ENODEV when no loop device is free, EIO for other failures."""
    done = subprocess.run(
        ["losetup", "--find", "--show", f"--direct-io={'on' if direct_io else 'off'}", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        message = done.stderr.strip() or f"losetup exited with status {done.returncode}"
        code = errno.ENODEV if "unused loop device" in message else errno.EIO
        raise OSError(code, f"cannot attach {image} to a loop device: {message}")
    return Path(done.stdout.strip())


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
