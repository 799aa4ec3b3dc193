"""Finding a path's filesystem type in mountinfo text (proc(5))."""

from __future__ import annotations

from pathlib import Path

import pytest

from coppice_agent.mounts import (
    Mount,
    filesystem_type,
    is_network_filesystem,
    network_filesystem_of,
    parse_mountinfo,
)

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
30 22 0:30 / /mnt/data rw,relatime shared:20 master:3 - nfs4 server:/export rw,vers=4.2
31 30 0:31 / /mnt/data/scratch rw,relatime - tmpfs tmpfs rw
32 22 0:32 / /mnt/my\\040share rw,relatime - cifs //host/share rw
33 22 0:33 / /home/user/remote rw,nosuid,nodev - fuse.sshfs user@host:/ rw,user_id=0
34 22 0:34 /sub /mnt/dataset rw - 9p hostshare rw,trans=virtio
35 22 0:35 / /mnt/stack rw - ext4 /dev/vdb rw
36 35 0:36 / /mnt/stack rw - nfs server:/over rw
garbage line
37 22 0:37 / /mnt/no-separator rw
"""


def test_parse_unescapes_mount_points_and_skips_malformed_lines() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[0] == Mount("/", "ext4")
    assert Mount("/mnt/my share", "cifs") in mounts
    # Optional fields ("shared:20 master:3") come before the separator.
    assert Mount("/mnt/data", "nfs4") in mounts
    assert all(m.mount_point != "/mnt/no-separator" for m in mounts)
    assert len(mounts) == 9


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "ext4"),
        ("/etc/passwd", "ext4"),
        ("/proc/self", "proc"),
        ("/mnt/data", "nfs4"),
        ("/mnt/data/deep/dir", "nfs4"),
        # A longer mount point wins: a local mount below a network one is local.
        ("/mnt/data/scratch/x", "tmpfs"),
        # A prefix of the name is not a parent directory.
        ("/mnt/database", "ext4"),
        ("/mnt/my share/x", "cifs"),
        ("/home/user/remote/code", "fuse.sshfs"),
        ("/mnt/dataset", "9p"),
        # Mounted over the same point: the one listed last is on top.
        ("/mnt/stack/f", "nfs"),
    ],
)
def test_filesystem_type_is_the_longest_containing_mount(path: str, expected: str) -> None:
    assert filesystem_type(parse_mountinfo(MOUNTINFO), path) == expected


def test_no_mounts_no_type() -> None:
    assert filesystem_type([], "/x") is None
    assert filesystem_type(parse_mountinfo(""), "/x") is None


@pytest.mark.parametrize(
    "fstype", ["nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "fuse", "fuse.sshfs"]
)
def test_network_filesystems(fstype: str) -> None:
    assert is_network_filesystem(fstype)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "tmpfs", "overlay", "proc", "fusectl"])
def test_local_filesystems(fstype: str) -> None:
    assert not is_network_filesystem(fstype)


def test_network_filesystem_of_resolves_symlinks(tmp_path: Path) -> None:
    (tmp_path / "nfs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nfs")
    mountinfo = tmp_path / "mountinfo"
    nfs = tmp_path.resolve() / "nfs"
    mountinfo.write_text(
        f"22 1 8:1 / / rw - ext4 /dev/vda rw\n30 22 0:30 / {nfs} rw - nfs4 s:/e rw\n"
    )
    assert network_filesystem_of(str(tmp_path / "link"), str(mountinfo)) == "nfs4"
    assert network_filesystem_of(str(tmp_path), str(mountinfo)) is None
    # Without a mount table to read, nothing is refused.
    assert network_filesystem_of(str(tmp_path), str(tmp_path / "missing")) is None


def test_the_real_mount_table_parses() -> None:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    assert filesystem_type(mounts, "/proc/self") == "proc"
