"""The vm substrate's writable disk: its size, how it is made, the clones' directory of
disks, and the golden snapshot it belongs to."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coppice.config import Limits
from coppice.errors import SubstrateError
from coppice.substrates.golden import META_VERSION, Golden
from coppice.substrates.vm_disk import (
    MIB,
    QCOW2_CLUSTER,
    WritableDisks,
    mkfs_argv,
    qcow2_metadata_bound,
    seed_argv,
    writable_disk_bytes,
)


def test_qcow2_tables_of_a_full_gibibyte_fit_in_a_few_clusters() -> None:
    # header, L1, one L2 table (8192 clusters of 128 KiB), refcount table and block, slack
    assert qcow2_metadata_bound(1024 * MIB) == 6 * QCOW2_CLUSTER
    # 64 GiB: 64 L2 tables, 9 refcount blocks (8 GiB each, and one for the tables)
    assert qcow2_metadata_bound(64 * 1024 * MIB) == (1 + 1 + 64 + 1 + 9 + 1) * QCOW2_CLUSTER


@pytest.mark.parametrize("disk_mb", [32, 100, 1024, 4096, 65536])
def test_the_disk_and_its_overlays_tables_never_outgrow_disk_mb(disk_mb: int) -> None:
    size = writable_disk_bytes(disk_mb)
    assert size % MIB == 0
    assert size + qcow2_metadata_bound(size) <= disk_mb * MIB
    assert disk_mb * MIB - size <= 2 * MIB or disk_mb > 4096  # the guest loses little


def test_a_disk_too_small_to_hold_anything_names_the_fix() -> None:
    with pytest.raises(SubstrateError, match="at least 32 MiB"):
        writable_disk_bytes(8)


def test_the_filesystem_has_no_journal_no_root_reserve_and_no_lazy_init() -> None:
    argv = mkfs_argv(Path("/s/writable.raw"))
    assert argv[0] == "mkfs.ext4" and argv[-1] == "/s/writable.raw"
    assert argv[argv.index("-m") + 1] == "0"
    assert "^has_journal" in argv[argv.index("-O") + 1].split(",")
    assert argv[argv.index("-E") + 1] == "lazy_itable_init=0"


def test_the_seed_names_its_backing_without_opening_it() -> None:
    assert seed_argv(Path("/g/writable.raw"), Path("/w/seed.qcow2"), 1023 * MIB) == [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=131072",
        "-u",
        "-b",
        "/g/writable.raw",
        "-F",
        "raw",
        "/w/seed.qcow2",
        str(1023 * MIB),
    ]


def test_clone_disks_are_one_file_per_entry(tmp_path: Path) -> None:
    seed = tmp_path / "seed.qcow2"
    seed.write_bytes(b"QFI\xfb" + b"\0" * 60)
    disks = WritableDisks(tmp_path / "vm-disks")
    assert disks.entry_ids() == set()
    made = disks.create("abc", seed)
    assert made == tmp_path / "vm-disks/abc.qcow2"
    assert made.read_bytes() == seed.read_bytes()
    (disks.root / "stray.txt").write_text("not a disk")
    assert disks.entry_ids() == {"abc"}
    disks.remove("abc")
    disks.remove("abc")  # already gone: no error
    assert disks.entry_ids() == set()
    (disks.root / "stray.txt").unlink()
    disks.remove_root_if_empty()
    assert not disks.root.exists()


def test_a_golden_is_only_usable_for_the_disk_size_it_was_made_with(tmp_path: Path) -> None:
    for name in ("device.state", "writable.raw", "writable-seed.qcow2"):
        (tmp_path / name).write_bytes(b"x")
    ram = tmp_path / "g.ram"
    with ram.open("wb") as f:
        f.truncate(512 * MIB)
    golden = Golden(
        version=META_VERSION,
        template="python-vm",
        key="python-vm-0123456789ab",
        ram_file=str(ram),
        device_state=str(tmp_path / "device.state"),
        writable_disk=str(tmp_path / "writable.raw"),
        writable_seed=str(tmp_path / "writable-seed.qcow2"),
        memory_mb=512,
        disk_mb=1024,
        accel="tcg",
        image="/t/vm",
        boot_seconds=18.0,
        created_at=0.0,
    )
    limits = Limits(memory_mb=512, disk_mb=1024)
    assert golden.usable_for("/t/vm", limits, "tcg")
    assert not golden.usable_for("/t/vm", dataclasses.replace(limits, disk_mb=2048), "tcg")
    (tmp_path / "writable.raw").unlink()
    assert not golden.usable_for("/t/vm", limits, "tcg")
