"""A whole VM's state in one file: its memory and its devices, as QEMU's migration stream.

The golden snapshot saves devices only (its RAM is a file of its own, shared by the clones);
a snapshot, a fork or a pause of one sandbox must outlive the golden's RAM file (it is on
/dev/shm and a host reboot ends it) and hold what the sandbox wrote since, so it saves the
RAM too. QEMU's stream carries each non-zero page whole and each zero page as a few bytes,
so the file is the guest's written memory plus well under one per cent.

QEMU writes and reads the file itself through a descriptor passed over its monitor: through
`exec:cat` the same 230 MB took 400-770 ms here, through the descriptor 125-170 ms.
Bandwidth is unlimited: the guest is stopped, nothing competes with the copy, and QEMU's
default of 32 MiB/s would make it seven seconds.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from coppice.errors import HostResourceExhausted, SubstrateError
from coppice.substrates.golden import wait_for_migration
from coppice.substrates.qmp_channel import QmpChannel

#: migration's own limit, in bytes per second: far beyond any disk
UNLIMITED = 2**40
FD_NAME = "coppice-state"


@dataclass(frozen=True)
class SavedState:
    path: Path
    size_bytes: int
    #: pages QEMU saw as holding data (the rest were zero)
    data_pages: int
    zero_pages: int


def save(qmp: QmpChannel, target: Path, timeout_s: float = 120.0) -> SavedState:
    """Write the stopped VM's memory and devices to `target` (created here). The VM stays
    stopped; `cont` runs it again. A partial file is removed on failure."""
    qmp.execute(
        "migrate-set-capabilities",
        # A clone restored from the golden turned this on, and it would leave out RAM that
        # is a shared file (a sandbox started from a snapshot has its RAM in one).
        {"capabilities": [{"capability": "x-ignore-shared", "state": False}]},
    )
    qmp.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED})
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _host_error(exc, target) from exc
    try:
        try:
            qmp.pass_file(FD_NAME, fd)
        finally:
            os.close(fd)
        qmp.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        wait_for_migration(qmp, timeout_s=timeout_s)
        ram = qmp.execute("query-migrate").get("ram", {})
        size = target.stat().st_size
    except SubstrateError as exc:
        target.unlink(missing_ok=True)
        if _nearly_full(target.parent):
            raise HostResourceExhausted(
                f"the host's disk filled up while the VM's state was saved ({exc}); free "
                f"space in {target.parent}"
            ) from exc
        raise
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if size == 0:
        target.unlink(missing_ok=True)
        raise SubstrateError("QEMU wrote an empty state file; is the host's disk full?")
    return SavedState(target, size, int(ram.get("normal", 0)), int(ram.get("duplicate", 0)))


def load(qmp: QmpChannel, source: Path, timeout_s: float = 120.0) -> None:
    """Load a saved state into a QEMU started with `-incoming defer`; it stays stopped."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SubstrateError(f"cannot open the saved VM state {source}: {exc}") from exc
    try:
        qmp.pass_file(FD_NAME, fd)
    finally:
        os.close(fd)
    qmp.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
    wait_for_migration(qmp, timeout_s=timeout_s)


def _nearly_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 2**20


def _host_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HostResourceExhausted(
            f"the host's disk is full, so the VM's state cannot be saved to {path}; free "
            f"space in {path.parent}"
        )
    return SubstrateError(f"cannot save the VM's state to {path}: {exc}")
