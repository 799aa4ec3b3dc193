"""Every memory-backed mount of a jail is bounded (bwrap's --size before each --tmpfs)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from coppice.config import Limits, Settings
from coppice.substrates.jail import MIB, RUN_TMPFS_MB, isolation_argv, shm_tmpfs_mb, tmpfs_argv


def _sizes(argv: list[str]) -> dict[str, int]:
    """Each --tmpfs target and its size: bwrap takes --size (and --perms) just before it."""
    sizes: dict[str, int] = {}
    for i, arg in enumerate(argv):
        if arg != "--tmpfs":
            continue
        modifiers: dict[str, str] = {}
        j = i
        while j >= 2 and argv[j - 2] in ("--size", "--perms"):
            modifiers[argv[j - 2]] = argv[j - 1]
            j -= 2
        assert "--size" in modifiers, f"--tmpfs {argv[i + 1]} has no --size"
        sizes[argv[i + 1]] = int(modifiers["--size"])
    return sizes


def test_shm_is_a_quarter_of_the_memory_and_run_is_small() -> None:
    sizes = _sizes(tmpfs_argv(Limits(memory_mb=512)))
    assert sizes == {"/dev/shm": 128 * MIB, "/run": RUN_TMPFS_MB * MIB}


@given(st.integers(min_value=1, max_value=1 << 20))
def test_tmpfs_never_exceeds_the_sandbox_memory(memory_mb: int) -> None:
    shm = shm_tmpfs_mb(Limits(memory_mb=memory_mb))
    assert 1 <= shm <= max(1, memory_mb // 4)


def test_dev_is_read_only_after_shm_is_mounted_below_it() -> None:
    argv = tmpfs_argv(Limits())
    assert argv.index("--dev") < argv.index("/dev/shm") < argv.index("--remount-ro")
    assert argv[argv.index("--remount-ro") + 1] == "/dev"


def test_shm_is_writable_by_everyone_as_on_linux() -> None:
    argv = tmpfs_argv(Limits())
    shm = argv.index("/dev/shm")
    assert argv[argv.index("--perms", 0, shm) + 1] == "1777"


def test_the_jail_mounts_no_unbounded_tmpfs() -> None:
    argv = isolation_argv(Settings(), Path("/root"), "h", 3, Limits(memory_mb=1024), [])
    assert set(_sizes(argv)) == {"/dev/shm", "/run"}
    assert _sizes(argv)["/dev/shm"] == 256 * MIB
