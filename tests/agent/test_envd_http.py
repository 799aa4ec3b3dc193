"""The plain-HTTP half of envd: /health, /envs, /init, /files, and the access-token gate."""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from coppice_agent.downloads import choose_encoding, size_promise
from coppice_agent.rpc.process.process_pb import ListRequest, ProcessConfig, StartRequest
from tests.agent.envd_harness import EnvdServer, running_envd, sandbox_env
from tests.waiting import wait_until

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture(scope="module")
def envd(home: Path) -> Iterator[EnvdServer]:
    with running_envd(sandbox_env(home)) as server:
        yield server


@pytest.fixture
def http(envd: EnvdServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=envd.url, timeout=30) as client:
        yield client


def test_health(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 204


def test_multipart_single_file_uses_path_parameter(http: httpx.Client, tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "hello.txt"
    response = http.post(
        "/files",
        params={"path": str(target)},
        files=[("file", ("ignored-name", b"hello", "text/plain"))],
    )
    assert response.status_code == 200, response.text
    assert response.json() == [{"name": "hello.txt", "type": "file", "path": str(target)}]
    assert target.read_bytes() == b"hello"


def test_multipart_several_files_use_filenames(http: httpx.Client, tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "sub" / 'we"ird é.bin'
    first.write_text("old content that is longer")
    response = http.post(
        "/files",
        files=[
            ("file", (str(first), b"one", "text/plain")),
            ("file", (str(second), b"\x00two", "application/octet-stream")),
        ],
    )
    assert response.status_code == 200, response.text
    assert [entry["path"] for entry in response.json()] == [str(first), str(second)]
    assert first.read_bytes() == b"one"
    assert second.read_bytes() == b"\x00two"


def test_octet_stream_plain_and_gzip(http: httpx.Client, tmp_path: Path) -> None:
    target = tmp_path / "raw.bin"
    response = http.post(
        "/files",
        params={"path": str(target)},
        content=b"raw bytes",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert target.read_bytes() == b"raw bytes"
    response = http.post(
        "/files",
        params={"path": str(target)},
        content=gzip.compress(b"zipped " * 1000),
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    assert target.read_bytes() == b"zipped " * 1000


def test_ten_megabytes_round_trip(http: httpx.Client, tmp_path: Path) -> None:
    data = os.urandom(10 * 1024 * 1024)
    target = tmp_path / "big.bin"
    response = http.post(
        "/files", params={"path": str(target)}, files=[("file", (str(target), data))]
    )
    assert response.status_code == 200, response.text
    downloaded = http.get("/files", params={"path": str(target)})
    assert downloaded.status_code == 200
    assert hashlib.sha256(downloaded.content).digest() == hashlib.sha256(data).digest()

    def chunks() -> Iterator[bytes]:
        for offset in range(0, len(data), 1 << 20):
            yield data[offset : offset + (1 << 20)]

    streamed = tmp_path / "streamed.bin"
    response = http.post(
        "/files",
        params={"path": str(streamed)},
        content=chunks(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert streamed.read_bytes() == data


def test_upload_as_user_owns_file_and_parents(http: httpx.Client, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    target = tmp_path / "owned" / "f.txt"
    response = http.post(
        "/files",
        params={"path": str(target), "username": "nobody"},
        files=[("file", (str(target), b"x"))],
    )
    assert response.status_code == 200, response.text
    assert target.stat().st_uid == NOBODY.pw_uid
    assert target.parent.stat().st_uid == NOBODY.pw_uid


def test_relative_paths_resolve_against_home(http: httpx.Client, home: Path) -> None:
    name = "relative.txt"
    response = http.post("/files", params={"path": name}, files=[("file", (name, b"home"))])
    assert response.json()[0]["path"] == str(home / name)
    assert (home / name).read_bytes() == b"home"
    assert http.get("/files", params={"path": name}).content == b"home"


def test_download_errors(http: httpx.Client, tmp_path: Path) -> None:
    missing = http.get("/files", params={"path": str(tmp_path / "nope")})
    assert missing.status_code == 404
    assert missing.json()["code"] == 404
    assert "does not exist" in missing.json()["message"]
    directory = http.get("/files", params={"path": str(tmp_path)})
    assert directory.status_code == 400
    unknown_user = http.get("/files", params={"path": "/etc/hostname", "username": "nobody-here"})
    assert unknown_user.status_code == 400


def test_download_of_a_regular_file_has_its_length(http: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"0123456789")
    # httpx offers "gzip, deflate" on every request: that alone is no request for gzip.
    response = http.get("/files", params={"path": str(tmp_path / "f.bin")})
    assert response.headers["content-length"] == "10"
    assert response.headers["accept-ranges"] == "bytes"
    assert "content-encoding" not in response.headers
    assert response.headers["content-disposition"] == 'attachment; filename="f.bin"'
    assert response.content == b"0123456789"
    head = http.head("/files", params={"path": str(tmp_path / "f.bin")})
    assert (head.status_code, head.headers["content-length"], head.content) == (200, "10", b"")
    ranged = http.get(
        "/files", params={"path": str(tmp_path / "f.bin")}, headers={"Range": "bytes=2-4"}
    )
    assert (ranged.status_code, ranged.content) == (206, b"234")
    (tmp_path / "empty").write_bytes(b"")
    assert http.get("/files", params={"path": str(tmp_path / "empty")}).content == b""


def test_download_of_a_proc_file_reads_to_eof(http: httpx.Client) -> None:
    response = http.get("/files", params={"path": "/proc/self/status"})
    assert response.status_code == 200
    assert "content-length" not in response.headers
    assert "accept-ranges" not in response.headers
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.content.startswith(b"Name:")


def test_sizes_under_proc_and_sys_are_no_promise(tmp_path: Path) -> None:
    # A jail's /proc/meminfo is an lxcfs file: regular, with a size computed for whoever
    # asked last, not for this reader.
    regular = tmp_path / "f"
    regular.write_bytes(b"12345")
    info = regular.stat()
    assert size_promise(str(regular), info) == 5
    assert size_promise("/proc/meminfo", info) is None
    assert size_promise("/sys/devices/system/cpu/online", info) is None


def test_download_gzip_when_asked(http: httpx.Client, tmp_path: Path) -> None:
    data = b"squeeze me " * 10_000
    (tmp_path / "f.txt").write_bytes(data)
    for accept in ("gzip", "x-gzip", "identity;q=0, gzip", "gzip;q=1, identity;q=0.5"):
        with http.stream(
            "GET",
            "/files",
            params={"path": str(tmp_path / "f.txt")},
            headers={"Accept-Encoding": accept},
        ) as response:
            raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "gzip", accept
        assert "content-length" not in response.headers
        assert len(raw) < len(data) // 10
        assert gzip.decompress(raw) == data
    proc = http.get(
        "/files", params={"path": "/proc/self/status"}, headers={"Accept-Encoding": "gzip"}
    )
    assert proc.headers["content-encoding"] == "gzip"
    assert proc.content.startswith(b"Name:")


@pytest.mark.parametrize("accept", ["identity;q=0", "br, identity;q=0", "*;q=0", "gzip;q=0, *;q=0"])
def test_download_406_when_nothing_we_have_is_acceptable(
    http: httpx.Client, tmp_path: Path, accept: str
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    response = http.get(
        "/files", params={"path": str(tmp_path / "f")}, headers={"Accept-Encoding": accept}
    )
    assert response.status_code == 406
    assert response.json() == {
        "code": 406,
        "message": "no acceptable encoding found, supported: [identity, gzip]",
    }


@pytest.mark.parametrize("accept", ["identity", "gzip"])
def test_download_of_a_file_that_shrinks_is_aborted(
    http: httpx.Client, tmp_path: Path, accept: str
) -> None:
    target = tmp_path / "shrinking.bin"
    # Sparse: far more than the socket buffers hold, without writing any of it.
    target.touch()
    os.truncate(target, 256 * 1024 * 1024)
    with http.stream(
        "GET", "/files", params={"path": str(target)}, headers={"Accept-Encoding": accept}
    ) as response:
        chunks = response.iter_raw()
        next(chunks)
        os.truncate(target, 1024 * 1024)
        # Neither padded nor ended as if complete: the connection breaks off.
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in chunks:
                pass


def open_descriptors(target: str) -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(fd) == target
        except OSError:
            continue
    return count


def test_download_stops_when_the_client_goes_away(envd: EnvdServer) -> None:
    before = open_descriptors("/dev/zero")
    # Its own connection, closed on leaving: /dev/zero never ends, only the client can.
    with (
        httpx.Client(base_url=envd.url) as client,
        client.stream("GET", "/files", params={"path": "/dev/zero"}) as response,
    ):
        chunks = response.iter_raw()
        chunk = next(chunks)
        assert chunk and not chunk.strip(b"\0")
        assert open_descriptors("/dev/zero") == before + 1
    assert wait_until(lambda: open_descriptors("/dev/zero") == before)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "identity"),
        ("", "identity"),
        ("gzip", "gzip"),
        ("GZIP;q=0.8", "gzip"),
        ("gzip, deflate", "identity"),
        ("gzip, deflate, br, zstd", "identity"),
        ("br", "identity"),
        ("*", "identity"),
        ("gzip;q=0", "identity"),
        ("gzip;q=0.5, identity", "identity"),
        ("gzip, identity;q=0.5", "gzip"),
        ("identity;q=0, *", "gzip"),
        ("identity;q=0", None),
        ("*;q=0, identity;q=bogus", None),
        ("*;q=0, gzip", "gzip"),
    ],
)
def test_choose_encoding(accept: str | None, expected: str | None) -> None:
    assert choose_encoding(accept) == expected


def test_upload_errors(http: httpx.Client, tmp_path: Path) -> None:
    no_path = http.post(
        "/files", content=b"x", headers={"Content-Type": "application/octet-stream"}
    )
    assert no_path.status_code == 400
    onto_directory = http.post(
        "/files", params={"path": str(tmp_path)}, files=[("file", ("x", b"x"))]
    )
    assert onto_directory.status_code == 400
    no_files = http.post(
        "/files", params={"path": str(tmp_path / "f")}, files=[("other", (None, b"field"))]
    )
    assert no_files.status_code == 400


def test_full_disk_is_507(http: httpx.Client) -> None:
    # /dev/full answers every write with ENOSPC.
    response = http.post(
        "/files",
        params={"path": "/dev/full"},
        content=b"x" * 1024,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 507
    assert "disk space" in response.json()["message"]
    assert Path("/dev/full").exists()


def test_init_sets_env_vars_for_processes(envd: EnvdServer, http: httpx.Client) -> None:
    response = http.post("/init", json={"envVars": {"FROM_INIT": "42"}})
    assert response.status_code == 204
    assert http.get("/envs").json() == {"FROM_INIT": "42"}
    with envd.processes() as client:
        stream = client.start(
            StartRequest(
                process=ProcessConfig(cmd="/bin/sh", args=["-c", "echo $FROM_INIT"]), stdin=False
            )
        )
        output = b"".join(
            r.event.event.value.output.value  # type: ignore[union-attr]
            for r in stream
            if r.event is not None and r.event.event is not None and r.event.event.field == "data"
        )
    assert output == b"42\n"
    assert http.post("/init", content=b"[1]").status_code == 400


def test_access_token_is_enforced(home: Path) -> None:
    env = sandbox_env(home)
    with running_envd(env) as server, httpx.Client(base_url=server.url) as http:
        assert http.post("/init", json={"accessToken": "first"}).status_code == 204
        assert http.get("/health").status_code == 204

        denied = http.get("/envs")
        assert denied.status_code == 401
        assert denied.json()["code"] == 401
        assert http.get("/envs", headers={"X-Access-Token": "wrong"}).status_code == 401
        assert http.get("/envs", headers={"X-Access-Token": "first"}).status_code == 200
        assert http.post("/init", json={"accessToken": "second"}).status_code == 401
        rotated = http.post(
            "/init", json={"accessToken": "second"}, headers={"X-Access-Token": "first"}
        )
        assert rotated.status_code == 204

        with server.processes() as client:
            with pytest.raises(ConnectError) as info:
                client.list(ListRequest())
            assert info.value.code == Code.UNAUTHENTICATED
            assert client.list(ListRequest(), headers={"X-Access-Token": "second"}) is not None

        # Presigned URLs carry a signature instead of the header.
        signed = _signature("/etc/hostname", "read", "", "second")
        allowed = http.get("/files", params={"path": "/etc/hostname", "signature": signed})
        assert allowed.status_code == 200
        forged = _signature("/etc/hostname", "read", "", "wrong")
        refused = http.get("/files", params={"path": "/etc/hostname", "signature": forged})
        assert refused.status_code == 401


def _signature(path: str, operation: str, user: str, token: str) -> str:
    digest = hashlib.sha256(f"{path}:{operation}:{user}:{token}".encode()).digest()
    return "v1_" + base64.b64encode(digest).decode().rstrip("=")
