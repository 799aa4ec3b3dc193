"""Copying a sparse file as a sparse file: only its data extents are read and written.

A fresh entry disk is a copy of an empty filesystem image that is a gigabyte long and has
about a hundred kilobytes of data; copying the extents in-process (SEEK_DATA/SEEK_HOLE and
copy_file_range, which stays in the kernel) takes a fraction of a millisecond, where
`cp --sparse=always` costs a process start and reads the holes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def copy_sparse(source: Path, target: Path, mode: int = 0o600) -> None:
    """Create `target` (it must not exist) with `source`'s length and data, holes kept.
    Raises OSError (ENOSPC when the target's filesystem is full); a partial target is
    removed."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            _copy_extents(src, dst)
        except BaseException:
            os.close(dst)
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            raise
        os.close(dst)
    finally:
        os.close(src)


def _copy_extents(src: int, dst: int) -> None:
    size = os.fstat(src).st_size
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            offset = os.lseek(src, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole after offset
            return
        end = os.lseek(src, offset, os.SEEK_HOLE)
        while offset < end:
            copied = os.copy_file_range(src, dst, end - offset, offset, offset)
            if copied == 0:
                return  # the source shrank under us
            offset += copied
