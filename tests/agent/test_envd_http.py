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

from coppice_agent.environment import SandboxEnvironment
from coppice_agent.rpc.process.process_pb import ListRequest, ProcessConfig, StartRequest
from tests.agent.envd_harness import EnvdServer, running_envd

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture(scope="module")
def envd() -> Iterator[EnvdServer]:
    with running_envd(SandboxEnvironment(default_user="root")) as server:
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


def test_relative_paths_resolve_against_home(http: httpx.Client) -> None:
    name = f"coppice-envd-test-{os.getpid()}.txt"
    try:
        response = http.post("/files", params={"path": name}, files=[("file", (name, b"home"))])
        assert response.json()[0]["path"] == f"/root/{name}"
        assert http.get("/files", params={"path": name}).content == b"home"
    finally:
        Path("/root", name).unlink(missing_ok=True)


def test_download_errors(http: httpx.Client, tmp_path: Path) -> None:
    missing = http.get("/files", params={"path": str(tmp_path / "nope")})
    assert missing.status_code == 404
    assert missing.json()["code"] == 404
    assert "does not exist" in missing.json()["message"]
    directory = http.get("/files", params={"path": str(tmp_path)})
    assert directory.status_code == 400
    unknown_user = http.get("/files", params={"path": "/etc/hostname", "username": "nobody-here"})
    assert unknown_user.status_code == 400


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


def test_access_token_is_enforced() -> None:
    env = SandboxEnvironment(default_user="root")
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
