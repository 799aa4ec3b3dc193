"""Just enough of 64-bit little-endian ELF to check what the VM image is made of.

The builder looks inside three kinds of ELF file: busybox (must be static, because the
initramfs has no dynamic loader), the kernel (must carry a PVH entry note, because QEMU's
microvm boots it directly) and kernel modules (their `.modinfo` names their dependencies,
since Debian ships no modules.dep and the host has no depmod).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from coppice.errors import TemplateBuildError

_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_NOTE_HEADER = struct.Struct("<III")
PT_INTERP = 3
PT_NOTE = 4


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


@dataclass(frozen=True)
class _Header:
    phoff: int
    phentsize: int
    phnum: int
    shoff: int
    shentsize: int
    shnum: int
    shstrndx: int


def _header(data: bytes, what: str) -> _Header:
    if len(data) < _HEADER.size or data[:4] != b"\x7fELF":
        raise TemplateBuildError(f"{what} is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise TemplateBuildError(f"{what} is not a 64-bit little-endian ELF file")
    fields = _HEADER.unpack_from(data)
    return _Header(
        phoff=fields[5],
        phentsize=fields[9],
        phnum=fields[10],
        shoff=fields[6],
        shentsize=fields[11],
        shnum=fields[12],
        shstrndx=fields[13],
    )


def _segments(data: bytes, what: str) -> Iterator[tuple[int, bytes]]:
    """(type, contents) of every program header."""
    h = _header(data, what)
    for i in range(h.phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz, _memsz, _align = (
            _PROGRAM_HEADER.unpack_from(data, h.phoff + i * h.phentsize)
        )
        yield p_type, data[offset : offset + filesz]


def has_interpreter(data: bytes, what: str) -> bool:
    """Whether the program needs a dynamic loader (PT_INTERP), i.e. is not static."""
    return any(p_type == PT_INTERP for p_type, _ in _segments(data, what))


def _aligned(n: int) -> int:
    return (n + 3) & ~3


def notes(data: bytes, what: str) -> Iterator[Note]:
    for p_type, segment in _segments(data, what):
        if p_type != PT_NOTE:
            continue
        pos = 0
        while pos + _NOTE_HEADER.size <= len(segment):
            namesz, descsz, n_type = _NOTE_HEADER.unpack_from(segment, pos)
            pos += _NOTE_HEADER.size
            name = segment[pos : pos + namesz].rstrip(b"\0")
            pos += _aligned(namesz)
            desc = segment[pos : pos + descsz]
            pos += _aligned(descsz)
            yield Note(name, n_type, desc)


def section(data: bytes, name: str, what: str) -> bytes | None:
    """The contents of the section called `name`, or None if there is none."""
    h = _header(data, what)
    if h.shnum == 0 or h.shstrndx >= h.shnum:
        return None

    def entry(i: int) -> tuple[int, int, int]:
        fields = _SECTION_HEADER.unpack_from(data, h.shoff + i * h.shentsize)
        return fields[0], fields[4], fields[5]  # name offset, file offset, size

    _, str_offset, str_size = entry(h.shstrndx)
    names = data[str_offset : str_offset + str_size]
    wanted = name.encode()
    for i in range(h.shnum):
        name_offset, offset, size = entry(i)
        end = names.find(b"\0", name_offset)
        if names[name_offset:end] == wanted:
            return data[offset : offset + size]
    return None
