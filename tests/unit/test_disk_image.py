"""Sizing the ext4 root image from the tree it is made of."""

from __future__ import annotations

import os
from pathlib import Path

from coppice.images.disk_image import MIB, TreeUsage, image_size_mib, inode_count, tree_usage


def test_hard_links_count_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "d/a", tmp_path / "d/b")
    usage = tree_usage(tmp_path)
    assert usage.inodes == 3  # the root, d, and one file under two names
    assert 100_000 <= usage.bytes < 2 * 100_000


def test_the_image_leaves_room_for_ext4_and_many_small_files() -> None:
    usage = TreeUsage(bytes=400 * MIB, inodes=30_000)
    assert image_size_mib(usage) >= 400 + 100 + 256
    assert inode_count(usage) > 30_000
