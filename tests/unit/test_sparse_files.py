"""A sparse copy keeps the data and the holes, and never overwrites."""

from __future__ import annotations

from pathlib import Path

import pytest

from coppice.host.sparse_files import copy_sparse

MIB = 1024 * 1024


def test_data_is_copied_and_holes_stay_holes(tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    with open(source, "wb") as f:
        f.truncate(256 * MIB)
        f.write(b"head")
        f.seek(100 * MIB)
        f.write(b"middle" * 1000)
    target = tmp_path / "target.img"
    copy_sparse(source, target)
    assert target.stat().st_size == 256 * MIB
    assert target.stat().st_blocks * 512 < 2 * MIB  # not 256 MiB of zeros
    with open(source, "rb") as a, open(target, "rb") as b:
        for offset in (0, 100 * MIB, 256 * MIB - 4096):
            a.seek(offset)
            b.seek(offset)
            assert a.read(8192) == b.read(8192)


def test_an_empty_sparse_file_copies(tmp_path: Path) -> None:
    source = tmp_path / "hole.img"
    with open(source, "wb") as f:
        f.truncate(10 * MIB)
    copy_sparse(source, tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == bytes(10 * MIB)


def test_an_existing_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        copy_sparse(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"keep"
