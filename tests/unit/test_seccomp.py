"""The jail's seccomp filter, compiled to classic BPF (nothing is loaded into the kernel)."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pyseccomp
import pytest

from coppice.substrates.seccomp import DENIED_SYSCALLS, compile_filter, ensure_filter_file

#: struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; } in host byte order
SOCK_FILTER = struct.Struct("=HBBI")
BPF_MAXINSNS = 4096
BPF_RET_K = 0x06
BPF_JEQ_K = 0x15
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000


def instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    return [SOCK_FILTER.unpack_from(program, off) for off in range(0, len(program), 8)]


@pytest.fixture(scope="module")
def program() -> bytes:
    return compile_filter()


def test_program_is_whole_instructions(program: bytes) -> None:
    assert SOCK_FILTER.size == 8
    assert len(program) > 0
    assert len(program) % 8 == 0
    assert len(program) // 8 <= BPF_MAXINSNS


def test_compilation_is_deterministic(program: bytes) -> None:
    assert compile_filter() == program


def test_program_returns_allow_eperm_and_enosys(program: bytes) -> None:
    returns = {k for code, _, _, k in instructions(program) if code == BPF_RET_K}
    assert SECCOMP_RET_ALLOW in returns  # default allow
    assert SECCOMP_RET_ERRNO | errno.EPERM in returns  # the deny list
    assert SECCOMP_RET_ERRNO | errno.ENOSYS in returns  # clone3


def test_program_checks_the_architecture_first(program: bytes) -> None:
    code, _, _, k = instructions(program)[0]
    # ld [4]: offsetof(struct seccomp_data, arch)
    assert (code, k) == (0x20, 4)


def test_every_denied_syscall_of_this_architecture_is_compared(program: bytes) -> None:
    compared = {k for code, _, _, k in instructions(program) if code == BPF_JEQ_K}
    native = pyseccomp.Arch.NATIVE
    checked = 0
    for name in (*DENIED_SYSCALLS, "clone", "clone3"):
        number = pyseccomp.resolve_syscall(native, name)
        assert isinstance(number, int)
        if number < 0:  # not a system call on this architecture (iopl on arm64, ...)
            continue
        assert number in compared, name
        checked += 1
    assert checked >= len(DENIED_SYSCALLS) // 2


def test_deny_list_has_no_duplicates_and_names_real_calls() -> None:
    assert len(set(DENIED_SYSCALLS)) == len(DENIED_SYSCALLS)
    for name in ("mount", "unshare", "setns", "bpf", "keyctl", "userfaultfd"):
        assert name in DENIED_SYSCALLS


def test_ensure_filter_file_is_content_addressed(tmp_path: Path, program: bytes) -> None:
    directory = tmp_path / "run" / "seccomp"
    path = ensure_filter_file(directory)
    assert path.parent == directory
    assert path.name.startswith("seccomp-")
    assert path.suffix == ".bpf"
    assert path.read_bytes() == program
    assert [p.name for p in directory.iterdir()] == [path.name]  # no temp file left behind
    mtime = path.stat().st_mtime_ns
    assert ensure_filter_file(directory) == path
    assert path.stat().st_mtime_ns == mtime  # an existing file is reused, not rewritten
