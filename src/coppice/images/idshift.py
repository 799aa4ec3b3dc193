"""Shift the owners of a root filesystem into the id range a jail's user namespace maps.

Root inside a jail is uid `base` outside, so the template's files must be owned by `base + n`
for the jail to see them as owned by `n`. The shift happens once, at build time.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def shift_ownership(root: Path, base: int) -> int:
    """Add `base` to every uid and gid under `root`; returns how many inodes were changed."""
    seen: set[int] = set()
    changed = 0

    def shift(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            # A hard link would otherwise be shifted once per name.
            if st.st_ino in seen:
                return
            seen.add(st.st_ino)
        if st.st_uid >= base:  # already shifted (a resumed build); never shift twice
            return
        os.lchown(path, st.st_uid + base, st.st_gid + base)
        if not stat.S_ISLNK(st.st_mode):
            # chown clears setuid/setgid bits; put the mode back exactly as it was.
            os.chmod(path, stat.S_IMODE(st.st_mode))
        changed += 1

    shift(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            shift(os.path.join(dirpath, name))
    return changed


def unshift_ownership(root: Path, base: int) -> int:
    """The inverse of `shift_ownership`, for images that leave the jail id range (a vm's
    disk is owned by real ids); returns how many inodes were changed."""
    seen: set[int] = set()
    changed = 0

    def unshift(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                return
            seen.add(st.st_ino)
        if st.st_uid < base and st.st_gid < base:
            return
        uid = st.st_uid - base if st.st_uid >= base else st.st_uid
        gid = st.st_gid - base if st.st_gid >= base else st.st_gid
        os.lchown(path, uid, gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(path, stat.S_IMODE(st.st_mode))
        changed += 1

    unshift(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            unshift(os.path.join(dirpath, name))
    return changed
