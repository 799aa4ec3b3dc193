"""File metadata (envd 0.6.2): `X-Metadata-*` upload headers kept as `user.e2b.*` xattrs and
reported back, through the unmodified SDK and over raw HTTP for what the SDK never sends."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import InvalidArgumentException, Sandbox
from e2b.sandbox.filesystem.filesystem import WriteEntry

from coppice_agent import metadata
from tests.agent.envd_harness import EnvdServer, running_envd, sandbox_env, sdk_options


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[EnvdServer]:
    with running_envd(sandbox_env(home)) as server:
        yield server


@pytest.fixture(scope="module")
def sandbox(server: EnvdServer) -> Sandbox:
    return Sandbox(**sdk_options(server))


@pytest.fixture
def http(server: EnvdServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path)}


@pytest.mark.parametrize("octet_stream", [False, True], ids=["multipart", "octet-stream"])
def test_write_stores_metadata_and_lookups_report_it(
    sandbox: Sandbox, tmp_path: Path, octet_stream: bool
) -> None:
    path = f"{tmp_path}/d/f.txt"
    info = sandbox.files.write(
        path, "x", metadata={"Owner": "Alice", "kind": "a b"}, use_octet_stream=octet_stream
    )
    assert info.metadata == {"owner": "Alice", "kind": "a b"}
    assert xattrs(Path(path)) == {"user.e2b.owner": b"Alice", "user.e2b.kind": b"a b"}
    assert sandbox.files.get_info(path).metadata == {"owner": "Alice", "kind": "a b"}
    listed = {e.name: e.metadata for e in sandbox.files.list(f"{tmp_path}/d")}
    assert listed == {"f.txt": {"owner": "Alice", "kind": "a b"}}
    moved = sandbox.files.rename(path, f"{tmp_path}/moved.txt")
    assert moved.metadata == {"owner": "Alice", "kind": "a b"}


def test_each_upload_replaces_the_metadata(sandbox: Sandbox, tmp_path: Path) -> None:
    path = f"{tmp_path}/f.txt"
    os.mknod(path)
    # Attributes outside the e2b namespace belong to someone else and stay.
    os.setxattr(path, "user.other", b"kept")
    sandbox.files.write(path, "1", metadata={"a": "1", "b": "2"})
    assert sandbox.files.write(path, "2", metadata={"b": "3"}).metadata == {"b": "3"}
    assert sandbox.files.get_info(path).metadata == {"b": "3"}
    assert sandbox.files.write(path, "3").metadata is None
    assert sandbox.files.get_info(path).metadata is None
    assert xattrs(Path(path)) == {"user.other": b"kept"}


def test_every_file_of_a_multi_file_upload_gets_it(sandbox: Sandbox, tmp_path: Path) -> None:
    entries = [
        WriteEntry(path=f"{tmp_path}/one", data="1"),
        WriteEntry(path=f"{tmp_path}/two", data=b"2"),
    ]
    infos = sandbox.files.write_files(entries, metadata={"batch": "7"})
    assert [i.metadata for i in infos] == [{"batch": "7"}, {"batch": "7"}]
    assert sandbox.files.get_info(f"{tmp_path}/two").metadata == {"batch": "7"}


def test_metadata_set_out_of_band_is_reported(sandbox: Sandbox, tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("x")
    os.setxattr(target, "user.e2b.tag", b"by hand")
    os.setxattr(target, "user.e2b.binary", b"\xff")
    os.setxattr(target, "user.unrelated", b"no")
    (tmp_path / "link").symlink_to(target)
    expected = {"tag": "by hand", "binary": "\ufffd"}
    assert sandbox.files.get_info(str(target)).metadata == expected
    # A symlink describes its target, metadata included.
    assert sandbox.files.get_info(f"{tmp_path}/link").metadata == expected
    # Where the filesystem keeps no user attributes there is simply none.
    assert sandbox.files.get_info("/proc/self/status").metadata is None


def test_too_long_keys_and_too_much_metadata_are_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("old")
    with pytest.raises(InvalidArgumentException, match="longer than 246"):
        sandbox.files.write(str(path), "new", metadata={"k" * 247: "v"})
    sandbox.files.write(str(path), "ok", metadata={"k" * 246: "v"})
    with pytest.raises(InvalidArgumentException, match="4096"):
        sandbox.files.write(str(path), "new", metadata={f"k{i}": "v" * 1000 for i in range(5)})
    # Refused before the file was touched.
    assert path.read_text() == "ok"


def test_metadata_the_filesystem_cannot_hold_is_a_clear_error(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    # Within the 4096 bytes, but more than ext4 fits in its one attribute block; tmpfs and
    # others may take it. Either way the SDK must not be told the disk is full.
    crowded = {f"k{i}": "v" * 1013 for i in range(4)}
    try:
        info = sandbox.files.write(f"{tmp_path}/f", "x", metadata=crowded)
    except InvalidArgumentException as exc:
        assert "does not fit" in str(exc)
        assert not (tmp_path / "f").exists()
    else:
        assert info.metadata == crowded


def test_raw_header_rules(http: httpx.Client, tmp_path: Path) -> None:
    target = tmp_path / "f"

    def upload(headers: list[tuple[bytes, bytes]]) -> httpx.Response:
        return http.post(
            "/files",
            params={"path": str(target)},
            content=b"x",
            headers=[(b"Content-Type", b"application/octet-stream"), *headers],
        )

    first = upload([(b"X-Metadata-Key", b"first"), (b"x-metadata-KEY", b"second")])
    assert first.status_code == 200, first.text
    assert first.json()[0]["metadata"] == {"key": "first"}
    for bad in (b"tab\there", b"caf\xc3\xa9"):
        refused = upload([(b"X-Metadata-Key", bad)])
        assert refused.status_code == 400
        assert "printable US-ASCII" in refused.json()["message"]
    assert upload([(b"X-Metadata-", b"v")]).status_code == 400
    assert os.getxattr(target, "user.e2b.key") == b"first"


def test_a_filesystem_without_user_xattrs_is_a_clear_error(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*_: object) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    # What ramfs or an old tmpfs answer; the server runs in this process.
    monkeypatch.setattr(os, "setxattr", unsupported)
    monkeypatch.setattr(os, "listxattr", unsupported)
    with pytest.raises(InvalidArgumentException, match="does not support user extended"):
        sandbox.files.write(f"{tmp_path}/f", "x", metadata={"a": "b"})
    assert not (tmp_path / "f").exists()
    # Without metadata there is nothing to store, and nothing to clear.
    assert sandbox.files.write(f"{tmp_path}/g", "x").metadata is None
    assert (tmp_path / "g").read_text() == "x"


def test_header_parsing_rules() -> None:
    headers = [
        (b"x-metadata-a", b"1"),
        (b"content-type", b"text/plain"),
        (b"X-Metadata-A", b"2"),
        (b"x-metadata-b", b""),
    ]
    assert metadata.metadata_from_headers(headers) == {"a": "1", "b": ""}
    assert metadata.metadata_from_headers([]) == {}
    # The "user.e2b." of each key counts: 4 x (9 + 2 + 1013) is exactly 4096.
    exactly = [(f"x-metadata-k{i}".encode(), b"v" * 1013) for i in range(4)]
    assert len(metadata.metadata_from_headers(exactly)) == 4
    with pytest.raises(metadata.InvalidMetadata, match="4097 bytes"):
        metadata.metadata_from_headers([*exactly[:3], (b"x-metadata-k3", b"v" * 1014)])
    with pytest.raises(metadata.InvalidMetadata):
        metadata.metadata_from_headers([(b"x-metadata-a", b"\x7f")])
