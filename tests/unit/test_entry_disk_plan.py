"""What a jail entry's disk is and whose a loop device is, decided without I/O."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from coppice.substrates import entry_disk_plan as plan

DISKS = Path("/var/lib/coppice/entry-disks")


def test_an_entry_image_is_named_by_its_entry() -> None:
    name = plan.entry_image_name("0123abcdef")
    assert plan.entry_of_image(name) == "0123abcdef"


def test_only_entry_images_name_entries() -> None:
    assert plan.entry_of_image("empty") is None  # the directory of empty images
    assert plan.entry_of_image(".ext4-1024m-x.img.123.456") is None  # one being made
    assert plan.entry_of_image(".img") is None
    assert plan.entry_of_image("notes.txt") is None


def test_a_loop_device_over_an_entry_image_is_that_entry_s() -> None:
    assert plan.entry_of_backing_file(f"{DISKS}/0123abcdef.img", DISKS) == "0123abcdef"


def test_an_unlinked_image_still_names_its_entry() -> None:
    # Teardown deletes the image; a device still held open keeps reporting it.
    backing = f"{DISKS}/0123abcdef.img (deleted)"
    assert plan.entry_of_backing_file(backing, DISKS) == "0123abcdef"


def test_loop_devices_of_others_are_not_ours() -> None:
    assert plan.entry_of_backing_file("/var/tmp/other/entry-disks/0123abcdef.img", DISKS) is None
    assert plan.entry_of_backing_file("/srv/images/disk.img", DISKS) is None
    assert plan.entry_of_backing_file(f"{DISKS}/empty/{plan.empty_image_name(1024)}", DISKS) is None


def test_each_disk_size_has_its_own_empty_image() -> None:
    assert plan.empty_image_name(1024) != plan.empty_image_name(2048)
    assert plan.FORMAT_TAG in plan.empty_image_name(1024)


def test_the_filesystem_has_no_journal_and_no_reserved_blocks() -> None:
    argv = plan.mkfs_argv(Path("/x.img"))
    assert argv[0] == "mkfs.ext4" and argv[-1] == "/x.img"
    features = argv[argv.index("-O") + 1].split(",")
    assert "^has_journal" in features
    assert argv[argv.index("-m") + 1] == "0"


def test_deleted_blocks_go_back_to_the_host() -> None:
    assert "discard" in plan.MOUNT_DATA.split(",")


@given(st.integers(min_value=1, max_value=1 << 20), st.integers(min_value=0, max_value=1 << 42))
def test_a_spawn_needs_room_for_its_whole_disk(size_mb: int, free: int) -> None:
    assert plan.has_room(free, size_mb) == (free >= size_mb * plan.MIB)
