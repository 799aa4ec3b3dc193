"""Shifting a root filesystem's owners into a jail's id range (needs root to chown)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from coppice.images.idshift import shift_ownership

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to other uids needs root")

BASE = 1_000_000


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def make_tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "rootfs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file")
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "home" / "user").mkdir(parents=True)
    (root / "home" / "user" / "notes").write_text("mine")
    os.chown(root / "home" / "user", 1000, 1000)
    os.chown(root / "home" / "user" / "notes", 1000, 100)
    su = root / "bin-su"
    su.write_text("#!/bin/sh\n")
    su.chmod(0o4755)
    sgid_dir = root / "var-mail"
    sgid_dir.mkdir()
    sgid_dir.chmod(0o2775)
    (root / "hard-a").write_text("linked")
    os.link(root / "hard-a", root / "hard-b")
    (root / "etc" / "alias").symlink_to("passwd")
    (root / "dangling").symlink_to("/does/not/exist")
    (root / "escape").symlink_to(outside)
    return root, outside


def test_shift_adds_base_to_every_owner_once(tmp_path: Path) -> None:
    root, _ = make_tree(tmp_path)
    before = {p: owner(p) for p in [root, *root.rglob("*")]}
    inodes = {os.lstat(p).st_ino for p in before}

    changed = shift_ownership(root, BASE)

    assert changed == len(inodes)  # the two names of the hard link count once
    for path, (uid, gid) in before.items():
        assert owner(path) == (uid + BASE, gid + BASE), path
    assert owner(root / "home" / "user" / "notes") == (BASE + 1000, BASE + 100)
    assert owner(root / "hard-b") == (BASE, BASE)  # shifted once, not twice


def test_special_mode_bits_survive_the_chown(tmp_path: Path) -> None:
    root, _ = make_tree(tmp_path)
    shift_ownership(root, BASE)
    assert stat.S_IMODE(os.lstat(root / "bin-su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(root / "var-mail").st_mode) == 0o2775


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    root, outside = make_tree(tmp_path)
    shift_ownership(root, BASE)
    assert owner(outside) == (0, 0)
    assert owner(outside / "secret") == (0, 0)
    assert owner(root / "escape")[0] == BASE  # the link itself is shifted
    assert os.readlink(root / "escape") == str(outside)


def test_shifting_again_changes_nothing(tmp_path: Path) -> None:
    root, _ = make_tree(tmp_path)
    shift_ownership(root, BASE)
    after = {p: owner(p) for p in [root, *root.rglob("*")]}
    assert shift_ownership(root, BASE) == 0
    assert {p: owner(p) for p in after} == after


def test_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    assert shift_ownership(root, BASE) == 1
    assert owner(root) == (BASE, BASE)
