"""The writable disk of a vm sandbox: the upper layer of the guest's overlay root.

The guest's root is an overlay: the template's ext4 image below (read-only, shared by every
VM of the template) and this disk above, an ext4 filesystem sized to the template's
`disk_mb`, in a file on the host's disk. A clone resumes from the golden VM's memory, in
which that filesystem is already mounted (its superblock, inodes and page cache are in the
snapshot), so every clone must start from the disk exactly as the golden left it:

  <state_dir>/vm-golden/<key>/writable.raw         the golden's disk as it was saved: sparse,
                                                   never written again
                              writable-seed.qcow2  an empty qcow2 overlay on it
  <state_dir>/vm-disks/<entry id>.qcow2            a clone's disk: a copy of the seed, so a
                                                   clone starts with a 388 KiB file and its
                                                   writes land in it, never in the golden's

Measured against a sparse copy of the raw file per clone (bench/vm_disk_bench.py, ext4
without reflink): making either costs a fraction of a millisecond (seed copy 0.12 ms at p50,
sparse copy 0.17 ms, growing with what the golden wrote), but with qcow2's default 64 KiB
clusters a guest's first 4 KiB write into a cluster copies the other 60 KiB in, and such
writes ran at a third of the raw file's speed (70 against 240 MB/s). Extended L2 entries
split each 128 KiB cluster into 4 KiB subclusters that are allocated one by one, which
brings them level with raw (190-290 MB/s), so that is the format.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

from coppice.errors import HostResourceExhausted, SubstrateError
from coppice.host.sparse_files import copy_sparse

MIB = 2**20
#: label of the writable filesystem, so a look with blkid says what the disk is
LABEL = "coppice-rw"
#: the clones' qcow2 clusters: 128 KiB, each of 32 subclusters of 4 KiB (extended L2)
QCOW2_CLUSTER = 128 * 1024
QCOW2_OPTIONS = f"extended_l2=on,cluster_size={QCOW2_CLUSTER}"
#: bytes per L2 entry with extended L2 (the cluster's offset and its subcluster bitmap)
L2_ENTRY = 16
#: qcow2's default 16-bit refcounts
REFCOUNT_BYTES = 2
SUFFIX = ".qcow2"
#: an entry's own copy of the disk under its overlay (see WritableDisks.own_base)
BASE_SUFFIX = ".base.raw"


def qcow2_metadata_bound(virtual_bytes: int) -> int:
    """The most a qcow2 overlay of this virtual size spends on its own tables when every
    cluster is written: header, L1 table, L2 tables, refcount table and blocks, plus a
    cluster of slack."""
    c = QCOW2_CLUSTER
    clusters = -(-virtual_bytes // c)
    l2 = -(-clusters // (c // L2_ENTRY))
    l1 = -(-(l2 * 8) // c)
    refblocks = -(-(clusters + l2 + l1 + 8) // (c // REFCOUNT_BYTES))
    return (1 + l1 + l2 + 1 + refblocks + 1) * c


def writable_disk_bytes(disk_mb: int) -> int:
    """The size of the guest's writable disk: `disk_mb` less what its qcow2 overlay needs
    for its own tables (rounded up to whole MiB), so the file on the host never grows past
    `disk_mb` even when the guest fills every block."""
    total = disk_mb * MIB
    reserve = -(-qcow2_metadata_bound(total) // MIB) * MIB
    if total - reserve < 16 * MIB:
        raise SubstrateError(
            f"a disk of {disk_mb} MiB is too small for a vm sandbox; give the template at "
            "least 32 MiB of disk (disk_mb)"
        )
    return total - reserve


def mkfs_argv(path: Path) -> list[str]:
    """ext4 for the writable layer. No journal: the disk dies with its sandbox, so crash
    consistency buys nothing and a journal would double every write. No blocks reserved for
    root: the sandbox's user gets the whole disk. Inode tables initialised now (mke2fs
    punches them as holes in a file) so that no ext4lazyinit thread writes them in every
    clone; no resize inode, the disk never grows."""
    return [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        LABEL,
        "-m",
        "0",
        "-O",
        "^has_journal,^resize_inode",
        "-E",
        "lazy_itable_init=0",
        str(path),
    ]


def seed_argv(backing: Path, seed: Path, size_bytes: int) -> list[str]:
    """An empty qcow2 overlay on the golden's raw disk. `-u` with the size given: the
    backing is named by the path it will have once the golden is in place, which need not
    exist yet."""
    return [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        QCOW2_OPTIONS,
        "-u",
        "-b",
        str(backing),
        "-F",
        "raw",
        str(seed),
        str(size_bytes),
    ]


def rebase_argv(overlay: Path, backing: Path) -> list[str]:
    """Point the overlay at another copy of the same backing: `-u` only rewrites the name in
    its header (nothing is compared or copied)."""
    return [
        "qemu-img",
        "rebase",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        str(backing),
        str(overlay),
    ]


def copy_disk(overlay: Path, backing: Path, overlay_to: Path, backing_to: Path) -> int:
    """Copy an overlay and the raw disk under it (both sparse) so the copy depends on
    neither, the copied overlay reading through to the copied backing. Returns the bytes the
    copies hold. The overlay must not be written meanwhile (its VM stopped and its block
    layer flushed, as a migration leaves it)."""
    try:
        copy_sparse(backing, backing_to)
        copy_sparse(overlay, overlay_to)
    except OSError as exc:
        backing_to.unlink(missing_ok=True)
        overlay_to.unlink(missing_ok=True)
        raise _host_error(exc, overlay_to) from exc
    try:
        _run(rebase_argv(overlay_to, backing_to), overlay_to)
    except BaseException:
        backing_to.unlink(missing_ok=True)
        overlay_to.unlink(missing_ok=True)
        raise
    return allocated_bytes(backing_to) + allocated_bytes(overlay_to)


def make_golden_disk(path: Path, size_bytes: int) -> None:
    """A fresh sparse file holding an empty ext4 filesystem (the golden boot mounts it)."""
    path.unlink(missing_ok=True)
    try:
        with path.open("wb") as f:
            f.truncate(size_bytes)
    except OSError as exc:
        raise _host_error(exc, path) from exc
    _run(mkfs_argv(path), path)


def make_seed(backing: Path, seed: Path, size_bytes: int) -> None:
    _run(seed_argv(backing, seed, size_bytes), seed)


def allocated_bytes(path: Path) -> int:
    """What the file holds on the host's disk (its blocks, not its apparent size)."""
    return path.stat().st_blocks * 512


class WritableDisks:
    """The directory of the clones' disks, one file per entry named by its id."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, entry_id: str) -> Path:
        return self.root / f"{entry_id}{SUFFIX}"

    def create(self, entry_id: str, seed: Path) -> Path:
        disk = self.path(entry_id)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(seed, disk)
        except OSError as exc:
            disk.unlink(missing_ok=True)
            raise _host_error(exc, disk) from exc
        return disk

    def own_base(self, entry_id: str) -> Path:
        """The entry's own copy of the disk its overlay reads through to, for a disk that
        must outlive the golden's (a paused sandbox's: a host reboot rebuilds the golden,
        and its new disk is not the one the overlay was written on) or that came from a
        snapshot."""
        return self.root / f"{entry_id}{BASE_SUFFIX}"

    def create_from(self, entry_id: str, overlay: Path, backing: Path) -> tuple[Path, Path]:
        """The entry's disk as a copy of a snapshot's; returns (its overlay, its base)."""
        self.root.mkdir(parents=True, exist_ok=True)
        disk, base = self.path(entry_id), self.own_base(entry_id)
        copy_disk(overlay, backing, disk, base)
        return disk, base

    def make_own(self, entry_id: str, backing: Path) -> Path:
        """Give the entry's overlay a backing of its own (a copy of `backing`, the golden's
        disk), unless it has one already; returns the backing it now has."""
        base = self.own_base(entry_id)
        if Path(backing) == base:
            return base
        tmp = base.with_name(base.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            copy_sparse(backing, tmp)
            # The overlay names its own base before that base exists under the name, so an
            # existing base always means the overlay is on it; a crash in between is
            # repaired by the next call, from `backing` again.
            _run(rebase_argv(self.path(entry_id), base), base)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _host_error(exc, base) from exc
        except SubstrateError:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(base)
        return base

    def remove(self, entry_id: str) -> None:
        self.path(entry_id).unlink(missing_ok=True)
        self.own_base(entry_id).unlink(missing_ok=True)
        self.own_base(entry_id).with_name(self.own_base(entry_id).name + ".tmp").unlink(
            missing_ok=True
        )

    def entry_ids(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {
            p.name.split(".", 1)[0]
            for p in self.root.iterdir()
            if p.name.endswith((SUFFIX, BASE_SUFFIX, BASE_SUFFIX + ".tmp"))
        }

    def remove_root_if_empty(self) -> None:
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def _host_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HostResourceExhausted(
            f"the host's disk is full, so {path} cannot be made; free space in {path.parent}"
        )
    return SubstrateError(f"cannot make the vm disk {path}: {exc}")


def _run(argv: list[str], made: Path) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise SubstrateError(f"cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip()
        if "No space left" in detail:
            raise HostResourceExhausted(
                f"{argv[0]} ran out of space on the host; free space in {made.parent}: {detail}"
            )
        raise SubstrateError(f"{argv[0]} failed: {detail}")
