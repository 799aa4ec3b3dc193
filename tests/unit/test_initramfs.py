"""The initramfs writer: newc cpio archives parsed back member by member."""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

import pytest

from coppice.images.initramfs import (
    INITRAMFS_DIRS,
    ModuleFile,
    NewcArchive,
    build_initramfs,
)


@dataclass(frozen=True)
class Member:
    name: str
    mode: int
    uid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def parse_newc(archive: bytes) -> list[Member]:
    """An independent reader of the format, as the kernel's unpacker sees it."""
    members: list[Member] = []
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        _ino, mode, uid, _gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _chk = fields
        pos += 110
        name = archive[pos : pos + namesize - 1].decode()
        assert archive[pos + namesize - 1] == 0
        pos += namesize
        pos += -pos % 4
        data = archive[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return members
        members.append(Member(name, mode, uid, nlink, mtime, (rmaj, rmin), data))


@pytest.mark.parametrize("name_length", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("data_length", [0, 1, 2, 3, 4, 7])
def test_round_trip_pads_every_name_and_body_length(name_length: int, data_length: int) -> None:
    archive = NewcArchive()
    name = "n" * name_length
    data = bytes(range(data_length))
    archive.file(name, data, 0o640)
    archive.file("after", b"next")
    members = parse_newc(archive.finish())
    assert [(m.name, m.data) for m in members] == [(name, data), ("after", b"next")]
    assert members[0].mode == stat.S_IFREG | 0o640


def test_directories_symlinks_and_devices_keep_their_kind() -> None:
    archive = NewcArchive()
    archive.directory("bin")
    archive.symlink("bin/sh", "busybox")
    archive.char_device("dev/console", 5, 1)
    dirs, link, console = parse_newc(archive.finish())
    assert stat.S_ISDIR(dirs.mode) and dirs.nlink == 2
    assert stat.S_ISLNK(link.mode) and link.data == b"busybox"
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    assert all(m.uid == 0 and m.mtime == 0 for m in (dirs, link, console))


def test_initramfs_holds_init_busybox_and_modules_in_load_order() -> None:
    modules = [ModuleFile("virtio.ko", b"\x7fELF-a"), ModuleFile("virtio-rng.ko", b"\x7fELF-b")]
    image = build_initramfs(b"busybox-bytes", b"#!/bin/busybox sh\n", modules)
    members = {m.name: m for m in parse_newc(gzip.decompress(image))}
    assert set(INITRAMFS_DIRS) <= set(members)
    assert members["init"].data.startswith(b"#!/bin/busybox sh")
    assert members["init"].mode & 0o777 == 0o755
    assert members["bin/busybox"].mode & 0o111
    assert members["lib/modules/virtio-rng.ko"].data == b"\x7fELF-b"
    assert members["modules.order"].data == b"virtio.ko\nvirtio-rng.ko\n"
    assert stat.S_ISCHR(members["dev/console"].mode)


def test_same_inputs_give_the_same_bytes() -> None:
    def make() -> bytes:
        return build_initramfs(b"bb", b"init", [ModuleFile("a.ko", b"a")])

    assert make() == make()
