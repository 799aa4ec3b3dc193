"""The guest kernel: its release from apt-cache, vmlinux out of a bzImage's xz payload."""

from __future__ import annotations

import lzma
import struct

import pytest

from coppice.errors import TemplateBuildError
from coppice.images.kernel import check_pvh_entry, extract_vmlinux, kernel_release_of


def elf_with_note(name: bytes, note_type: int) -> bytes:
    """An ELF64 with one PT_NOTE segment holding one note."""
    padded_name = name + b"\0" * (-len(name) % 4 or 4)
    note = struct.pack("<III", len(name) + 1, 4, note_type) + padded_name + b"\0\0\0\0"
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    phoff = 64
    note_at = phoff + 56
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, 0, phoff, 0, 0, 64, 56, 1, 64, 0, 0)
    program = struct.pack("<IIQQQQQQ", 4, 4, note_at, 0, 0, len(note), len(note), 4)
    return header + program + note


def test_release_comes_from_the_metapackage_dependency() -> None:
    out = (
        "linux-image-amd64\n"
        "  Depends: linux-image-6.1.0-57-amd64\n"
        "  Recommends: firmware-linux-free\n"
    )
    assert kernel_release_of(out) == "6.1.0-57-amd64"
    with pytest.raises(TemplateBuildError, match="apt-get update"):
        kernel_release_of("linux-image-amd64\n  Recommends: apparmor\n")


def test_vmlinux_is_the_xz_payload_found_by_its_magic() -> None:
    vmlinux = elf_with_note(b"Xen", 18) + bytes(range(256)) * 64
    # A bzImage: real-mode setup and decompressor stub, the payload, then trailing data.
    setup = b"MZ" + b"\x90" * 4000 + b"HdrS" + b"\x00" * 500
    bzimage = setup + lzma.compress(vmlinux, format=lzma.FORMAT_XZ) + b"\x00" * 8
    assert extract_vmlinux(bzimage) == vmlinux
    check_pvh_entry(extract_vmlinux(bzimage), "test kernel")


def test_payload_problems_are_named() -> None:
    with pytest.raises(TemplateBuildError, match="no xz"):
        extract_vmlinux(b"MZ" + b"\0" * 100)
    truncated = lzma.compress(b"x" * 100_000, format=lzma.FORMAT_XZ)[:-20]
    with pytest.raises(TemplateBuildError, match=r"truncated|does not decompress"):
        extract_vmlinux(b"MZ" + truncated)


def test_a_kernel_without_pvh_entry_is_refused() -> None:
    with pytest.raises(TemplateBuildError, match="CONFIG_PVH"):
        check_pvh_entry(elf_with_note(b"GNU", 3), "test kernel")
