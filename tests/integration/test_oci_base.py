"""OCI images as template bases, end to end with the real skopeo and umoci: a tree written
as an archive comes back with the same files, owners and modes, cached by digest. Nothing
here reaches a registry: the one registry name is a TEST-NET address behind a proxy that
refuses at once, on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coppice.errors import TemplateBuildError
from coppice.images.oci import ImageDefaults, fetch_oci_rootfs, write_oci_archive
from coppice.images.spec import RegistryAuth

pytestmark = pytest.mark.integration

UNREACHABLE = "198.51.100.1:5000/x:y"  # TEST-NET-2: never a real host
CONFIG = ImageDefaults(
    env=(("PATH", "/usr/bin:/bin"), ("GREETING", "hello, world")),
    workdir="/home/u",
    user="u",
    entrypoint=("/bin/sh", "-c"),
    cmd=("echo hi",),
)


@dataclass
class RecordingProgress:
    stages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    logs: list[tuple[str, str | None]] = field(default_factory=list)

    def stage(self, name: str, total: int | None = None) -> None:
        self.stages.append(name)

    def advance(self, detail: str = "", step: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        self.logs.append((message, step))


@dataclass(frozen=True)
class Seen:
    kind: str
    uid: int
    gid: int
    mode: int
    content: str


def snapshot(root: Path) -> dict[str, Seen]:
    """Every path under `root` (itself included) as type, owner, mode and content."""
    seen: dict[str, Seen] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            kind, content = "link", os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            kind, content = "dir", ""
        else:
            kind, content = "file", path.read_text()
        rel = "." if path == root else str(path.relative_to(root))
        seen[rel] = Seen(kind, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), content)
    return seen


def make_tree(root: Path) -> None:
    def put(rel: str, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chown(path, uid, gid)
        path.chmod(mode)  # after chown, which clears setuid and setgid

    root.mkdir()
    root.chmod(0o755)
    put("etc/hostname", "oci-test\n", 0o644)
    put("etc/shadow", "root:*:19000::::::\n", 0o640, 0, 42)
    put("usr/bin/helper", "#!/bin/sh\necho helper\n", 0o4755)
    put("usr/bin/grouped", "#!/bin/sh\n", 0o2711, 0, 5)
    (root / "home/u").mkdir(parents=True)
    os.chown(root / "home/u", 1000, 1000)
    (root / "home/u").chmod(0o750)
    put("home/u/notes.txt", "mine\n", 0o600, 1000, 1000)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "usr/bin/sh").symlink_to("helper")
    os.lchown(root / "usr/bin/sh", 1000, 1000)
    put("nobody", "", 0o444, 65534, 65534)


@pytest.fixture()
def work() -> Iterator[Path]:
    if shutil.which("skopeo") is None or shutil.which("umoci") is None:
        pytest.skip("skopeo and umoci are not installed; run scripts/setup")
    path = Path(tempfile.mkdtemp(prefix="coppice-oci-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def archive(work: Path) -> tuple[Path, str, dict[str, Seen]]:
    tree = work / "tree"
    make_tree(tree)
    path = work / "image.tar"
    digest = write_oci_archive(tree, path, tag="v1", config=CONFIG)
    return path, digest, snapshot(tree)


def test_written_archive_comes_back_with_owners_and_modes(
    work: Path, archive: tuple[Path, str, dict[str, Seen]]
) -> None:
    path, digest, want = archive
    assert digest.startswith("sha256:")
    progress = RecordingProgress()
    base = fetch_oci_rootfs(f"oci-archive:{path}:v1", None, work / "cache", progress)

    assert snapshot(base.rootfs) == want
    assert base.digest == digest
    assert base.config == CONFIG
    assert progress.stages == [f"fetching image oci-archive:{path}:v1"]
    assert progress.logs, "skopeo's and umoci's output goes to the build log"
    assert all(step == "base" for _line, step in progress.logs)
    assert sorted(p.name for p in (work / "cache").iterdir() if not p.name.startswith(".")) == [
        f"oci-{digest.replace(':', '-')}"
    ]  # no scratch layout or half-made entry left behind


def test_second_fetch_is_a_cache_hit(
    work: Path, archive: tuple[Path, str, dict[str, Seen]]
) -> None:
    path, digest, _want = archive
    first = fetch_oci_rootfs(f"oci-archive:{path}:v1", None, work / "cache", RecordingProgress())
    marker = first.rootfs.parent / "marker"
    marker.write_text("still here")

    progress = RecordingProgress()
    started = time.monotonic()
    # The same image by another name: the cache is keyed by digest, not by the reference.
    again = fetch_oci_rootfs(f"oci-archive:{path}", None, work / "cache", progress)
    elapsed = time.monotonic() - started

    assert again == first
    assert marker.read_text() == "still here"
    assert progress.logs == [], "a cache hit copies and unpacks nothing"
    assert any(digest[:19] in note for note in progress.notes)
    assert elapsed < 5


def test_docker_archive_is_another_image_with_the_same_files(
    work: Path, archive: tuple[Path, str, dict[str, Seen]]
) -> None:
    path, digest, want = archive
    docker_archive = work / "docker.tar"
    subprocess.run(
        ["skopeo", "copy", "--insecure-policy", "--quiet",
         f"oci-archive:{path}:v1", f"docker-archive:{docker_archive}:test/image:v1"],
        check=True,
    )  # fmt: skip
    base = fetch_oci_rootfs(
        f"docker-archive:{docker_archive}", None, work / "cache", RecordingProgress()
    )
    assert base.digest != digest  # skopeo serves it with a Docker manifest of its own
    assert snapshot(base.rootfs) == want
    assert base.config.env == CONFIG.env
    assert base.config.command == CONFIG.command


def test_oci_layout_is_the_same_image(
    work: Path, archive: tuple[Path, str, dict[str, Seen]]
) -> None:
    path, digest, want = archive
    layout = work / "layout"
    subprocess.run(
        ["skopeo", "copy", "--insecure-policy", "--quiet",
         f"oci-archive:{path}:v1", f"oci:{layout}:v2"],
        check=True,
    )  # fmt: skip
    base = fetch_oci_rootfs(f"oci:{layout}:v2", None, work / "cache", RecordingProgress())
    assert base.digest == digest  # the same manifest, so the same cache entry
    assert snapshot(base.rootfs) == want


def test_concurrent_fetches_unpack_once(
    work: Path, archive: tuple[Path, str, dict[str, Seen]]
) -> None:
    path, _digest, want = archive
    progresses = [RecordingProgress() for _ in range(3)]
    with ThreadPoolExecutor(len(progresses)) as pool:
        bases = list(
            pool.map(
                lambda p: fetch_oci_rootfs(f"oci-archive:{path}:v1", None, work / "cache", p),
                progresses,
            )
        )
    assert len(set(bases)) == 1
    assert snapshot(bases[0].rootfs) == want
    unpacked = [p for p in progresses if any("unpack" in line for line, _ in p.logs)]
    assert len(unpacked) == 1, "the others waited for the lock and found it cached"


def test_an_archive_without_config_has_empty_defaults(work: Path) -> None:
    tree = work / "tree"
    make_tree(tree)
    write_oci_archive(tree, work / "plain.tar")
    base = fetch_oci_rootfs(
        f"oci-archive:{work / 'plain.tar'}", None, work / "cache", RecordingProgress()
    )
    assert base.config == ImageDefaults()


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive", "oci"])
def test_a_missing_archive_says_so(work: Path, transport: str) -> None:
    missing = work / "nothing-here"
    with pytest.raises(TemplateBuildError, match="does not exist") as caught:
        fetch_oci_rootfs(f"{transport}:{missing}", None, work / "cache", RecordingProgress())
    assert str(missing) in str(caught.value)
    assert not (work / "cache").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("ref", [f"docker://{UNREACHABLE}", UNREACHABLE])
def test_an_unreachable_registry_fails_fast_and_says_what_works_offline(
    work: Path, monkeypatch: pytest.MonkeyPatch, ref: str
) -> None:
    # skopeo honours the proxy variables: every connection it tries ends at a closed port
    # on loopback, so the test sends nothing off this host, whatever its network.
    proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    with pytest.raises(TemplateBuildError) as caught:
        fetch_oci_rootfs(ref, None, work / "cache", RecordingProgress(), inspect_timeout_s=5)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert ref in message
    assert "reach no image registry" in message
    assert "oci-archive:" in message
    assert not (work / "cache").exists()


def test_credentials_stay_out_of_errors(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    auth = RegistryAuth("alice", "hunter2-s3cret")
    progress = RecordingProgress()
    with pytest.raises(TemplateBuildError) as caught:
        fetch_oci_rootfs(UNREACHABLE, auth, work / "cache", progress, inspect_timeout_s=5)
    assert "hunter2-s3cret" not in str(caught.value)
    assert all("hunter2-s3cret" not in line for line, _step in progress.logs)


def test_writing_needs_a_directory(work: Path) -> None:
    with pytest.raises(TemplateBuildError, match="not a directory"):
        write_oci_archive(work / "absent", work / "x.tar")
    assert not (work / "x.tar").exists()
