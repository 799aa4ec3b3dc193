"""Module load order from a (fake) modules.dep, and dependencies read from .modinfo."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from coppice.errors import TemplateBuildError
from coppice.images.kernel_modules import (
    KernelModule,
    load_order,
    module_index,
    module_name,
    parse_builtin,
    parse_modules_dep,
)

MODULES_DEP = """\
kernel/virtio/virtio_ring.ko:
kernel/virtio/virtio.ko:
kernel/virtio/virtio_mmio.ko: kernel/virtio/virtio_ring.ko kernel/virtio/virtio.ko
kernel/block/virtio_blk.ko.xz: kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/virtio/virtio.ko
"""


def names(order: list[KernelModule]) -> list[str]:
    return [m.name for m in order]


def test_names_fold_dashes_and_compression_suffixes() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("kernel/block/virtio_blk.ko.xz") == "virtio_blk"
    with pytest.raises(TemplateBuildError):
        module_name("kernel/README")


def test_dependencies_load_first_and_once_in_the_order_asked() -> None:
    modules = parse_modules_dep(MODULES_DEP)
    order = load_order(
        ["virtio_mmio", "virtio_blk", "crc32c_generic", "ext4", "virtio-rng"],
        modules,
        frozenset(),
    )
    assert names(order) == [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "virtio_blk",
        "crc32c_generic",
        "jbd2",
        "mbcache",
        "crc16",
        "ext4",
        "virtio_rng",
    ]
    assert order[3].path == "kernel/block/virtio_blk.ko.xz"


def test_builtin_drivers_are_skipped_and_unknown_ones_named() -> None:
    modules = parse_modules_dep(MODULES_DEP)
    builtin = parse_builtin("kernel/fs/overlayfs/overlay.ko\n")
    assert names(load_order(["overlay", "virtio"], modules, builtin)) == ["virtio"]
    with pytest.raises(TemplateBuildError, match="no module vsock"):
        load_order(["vsock"], modules, builtin)
    broken = parse_modules_dep("kernel/a.ko: kernel/missing.ko\n")
    with pytest.raises(TemplateBuildError, match=r"no module missing \(needed by a\)"):
        load_order(["a"], broken, frozenset())


def test_a_dependency_cycle_is_an_error_not_a_hang() -> None:
    cyclic = parse_modules_dep("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
    with pytest.raises(TemplateBuildError, match="a -> b -> a"):
        load_order(["a"], cyclic, frozenset())


def fake_module(depends: str) -> bytes:
    """A minimal ELF64 with a section-name table and a .modinfo section."""
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    modinfo = f"license=GPL\0depends={depends}\0vermagic=6.1.0\0".encode()
    header_size, section_size = 64, 64
    strtab_at = header_size
    modinfo_at = strtab_at + len(shstrtab)
    sections_at = modinfo_at + len(modinfo)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 1, 62, 1, 0, 0, sections_at, 0, 64, 56, 0, 64, 3, 1
    )
    null = b"\0" * section_size
    strtab = struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, strtab_at, len(shstrtab), 0, 0, 1, 0)
    info = struct.pack("<IIQQQQIIQQ", 11, 1, 0, 0, modinfo_at, len(modinfo), 0, 0, 1, 0)
    return header + shstrtab + modinfo + null + strtab + info


def test_a_tree_without_modules_dep_gets_one_from_modinfo(tmp_path: Path) -> None:
    (tmp_path / "kernel/fs").mkdir(parents=True)
    (tmp_path / "kernel/fs/jbd2.ko").write_bytes(fake_module(""))
    (tmp_path / "kernel/fs/ext4.ko.xz").write_bytes(lzma.compress(fake_module("jbd2")))
    (tmp_path / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    modules, builtin = module_index(tmp_path)
    assert (tmp_path / "modules.dep").read_text() == (
        "kernel/fs/ext4.ko.xz: kernel/fs/jbd2.ko\nkernel/fs/jbd2.ko:\n"
    )
    assert builtin == {"overlay"}
    assert names(load_order(["overlay", "ext4"], modules, builtin)) == ["jbd2", "ext4"]
