"""Shift the owners of a root filesystem into the id range a jail's user namespace maps.

Root inside a jail is uid `base` outside, so the template's files must be owned by `base + n`
for the jail to see them as owned by `n`. The shift happens once, at build time.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path


def shift_ownership(root: Path, base: int) -> int:
    """Add `base` to every uid and gid under `root`; returns how many inodes were changed."""
    # Never shift twice: an inode already in the range is a resumed build's.
    return _rechown(root, lambda uid, gid: None if uid >= base else (uid + base, gid + base))


def unshift_ownership(root: Path, base: int) -> int:
    """The inverse of `shift_ownership`, for images that leave the jail id range (a vm's
    disk is owned by real ids); returns how many inodes were changed."""

    def down(uid: int, gid: int) -> tuple[int, int] | None:
        if uid < base and gid < base:
            return None
        return (uid - base if uid >= base else uid, gid - base if gid >= base else gid)

    return _rechown(root, down)


def _rechown(root: Path, new_ids: Callable[[int, int], tuple[int, int] | None]) -> int:
    seen: set[int] = set()
    changed = 0

    def visit(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            # A hard link would otherwise be changed once per name.
            if st.st_ino in seen:
                return
            seen.add(st.st_ino)
        ids = new_ids(st.st_uid, st.st_gid)
        if ids is None:
            return
        os.lchown(path, *ids)
        if not stat.S_ISLNK(st.st_mode):
            # chown clears setuid/setgid bits; put the mode back exactly as it was.
            os.chmod(path, stat.S_IMODE(st.st_mode))
        changed += 1

    visit(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            visit(os.path.join(dirpath, name))
    return changed
