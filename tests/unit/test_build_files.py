"""Uploaded build files: unpacked once, and nothing in an archive reaches outside it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from coppice.errors import TemplateBuildError
from coppice.images.build_files import UploadedFiles, hash_context_files


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def test_an_archive_unpacks_once_with_its_files(tmp_path: Path) -> None:
    files = UploadedFiles(tmp_path)
    _archive(files.archive_path("a" * 16), [_file("app/main.py", b"print(1)\n", 0o4755)])
    root = files.root_for("a" * 16)
    assert (root / "app/main.py").read_text() == "print(1)\n"
    assert (root / "app/main.py").stat().st_mode & 0o7777 == 0o755  # no setuid from uploads
    assert files.root_for("a" * 16) == root


@pytest.mark.parametrize(
    "member",
    [
        _file("../escape", b"x"),
        _file("/etc/passwd", b"x"),
    ],
)
def test_paths_outside_the_archive_are_refused(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes]
) -> None:
    files = UploadedFiles(tmp_path)
    _archive(files.archive_path("b" * 16), [member])
    with pytest.raises(TemplateBuildError, match="outside"):
        files.root_for("b" * 16)


def test_links_are_kept_but_nothing_is_written_through_them(tmp_path: Path) -> None:
    link = tarfile.TarInfo("abs-link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"  # read in the image, never here
    files = UploadedFiles(tmp_path)
    _archive(files.archive_path("c" * 16), [(link, None)])
    assert (files.root_for("c" * 16) / "abs-link").readlink() == Path("/etc")

    evil = tarfile.TarInfo("evil")
    evil.type, evil.linkname = tarfile.SYMTYPE, "/tmp"
    _archive(files.archive_path("e" * 16), [(evil, None), _file("evil/planted", b"x")])
    with pytest.raises(TemplateBuildError, match="through a symbolic link"):
        files.root_for("e" * 16)


def test_a_missing_upload_says_so(tmp_path: Path) -> None:
    with pytest.raises(TemplateBuildError, match="never uploaded"):
        UploadedFiles(tmp_path).root_for("d" * 16)


def test_context_hashes_follow_content(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1")
    first = hash_context_files(tmp_path, "a.txt")
    (tmp_path / "a.txt").write_text("2")
    assert hash_context_files(tmp_path, "a.txt") != first
