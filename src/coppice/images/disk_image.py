"""The VM's root disk: a raw, sparse ext4 image made from a root filesystem tree.

Guests mount it read-only under an overlay (their writes go to a disk of their own), so the
free space inside only has to absorb ext4's own overhead; the slack is generous because the
file is sparse and costs nothing until written.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from coppice.errors import TemplateBuildError

MIB = 2**20
#: room for ext4's metadata (inode tables, journal, directories) on top of the file data
SLACK_BYTES = 256 * MIB
SLACK_FRACTION = 0.25


@dataclass(frozen=True)
class TreeUsage:
    bytes: int
    inodes: int


def tree_usage(root: Path) -> TreeUsage:
    """Allocated bytes and inode count of the tree, each hard-linked file counted once."""
    total = 0
    seen: set[int] = set()
    count = 1
    for dirpath, dirs, files in os.walk(root):
        count += len(dirs)
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
                count += 1
    return TreeUsage(total, count)


def image_size_mib(usage: TreeUsage) -> int:
    wanted = usage.bytes * (1 + SLACK_FRACTION) + SLACK_BYTES
    return -(-int(wanted) // MIB)


def inode_count(usage: TreeUsage) -> int:
    # mke2fs sizes the inode table by bytes per inode, which a tree of many small Python
    # files can outrun; ask for enough explicitly.
    return usage.inodes + usage.inodes // 2 + 4096


def make_ext4(rootfs: Path, image: Path) -> None:
    usage = tree_usage(rootfs)
    image.unlink(missing_ok=True)
    done = subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "root",
            "-N",
            str(inode_count(usage)),
            "-d",
            str(rootfs),
            str(image),
            f"{image_size_mib(usage)}M",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        image.unlink(missing_ok=True)
        detail = done.stderr.strip() or done.stdout.strip()
        hint = ""
        if "No space left" in detail or "allocate" in detail:
            hint = f"; out of space (in the image, or on the disk holding {image.parent})"
        raise TemplateBuildError(f"mkfs.ext4 could not make {image.name}{hint}: {detail}")
