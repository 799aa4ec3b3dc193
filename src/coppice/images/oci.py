"""OCI images as template bases: fetched with skopeo, unpacked with umoci, cached by the
digest of their manifest; and a directory tree written back as a single-layer OCI archive.

The unpacked root keeps the image's own owners (real root ids, unshifted): the builder
shifts a copy of it into the jail's id range, as it does with a debootstrapped base.
The cache key is the digest of the manifest the source serves (for a registry, the digest
that `name@sha256:...` pins; for a multi-platform image, its index, which skopeo resolves
to this host's platform, as it always will on this host).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coppice.errors import CoppiceError, InvalidRequest, PrerequisiteMissing, TemplateBuildError
from coppice.images.file_lock import locked
from coppice.images.oci_config import ImageDefaults, image_defaults, umoci_config_args
from coppice.images.oci_ref import ImageSource, parse_image_source
from coppice.images.oci_tools import BASE_STEP, Finished, capture, require_oci_tools, stream
from coppice.images.spec import RegistryAuth
from coppice.progress import Progress, SilentProgress

__all__ = ["ImageDefaults", "OciBase", "fetch_oci_rootfs", "write_oci_archive"]

#: the tag an image gets in the scratch layout it is copied into
LAYOUT_TAG = "img"
#: the image's config blob, kept beside its unpacked root (the layout is not kept)
CONFIG_FILE = "image-config.json"
#: long enough for a slow registry to answer one manifest request, short enough that a
#: host without network fails a build in a minute, not in TCP's retry time
INSPECT_TIMEOUT_S = 60.0
#: OCI's grammar for a tag
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
#: what skopeo says when it cannot talk to a registry at all (as opposed to a registry
#: that answered no)
UNREACHABLE_MARKS = (
    "pinging container registry",
    "dial tcp",
    "no such host",
    "connection refused",
    "network is unreachable",
    "no route to host",
    "i/o timeout",
    "context deadline exceeded",
    "tls handshake timeout",
    "proxyconnect",
    # a network that intercepts TLS answers for every host, with its own certificate
    "x509:",
)
UNAUTHORIZED_MARKS = ("unauthorized", "authentication required", "denied")
OFFLINE_HINT = (
    "This host seems to reach no image registry. Bases that work offline: an "
    "`oci-archive:/path` (made where a registry is reachable with `skopeo copy "
    "docker://NAME oci-archive:/path`) or Coppice's own bases (e2bdev/base, "
    "e2bdev/code-interpreter, debian:bookworm, python:3.11)"
)


@dataclass(frozen=True)
class OciBase:
    #: the unpacked root filesystem, owned by the image's own (unshifted) ids; shared by
    #: every build on this image: copy it, never change it
    rootfs: Path
    #: the source's manifest digest: the cache key of everything built on it
    digest: str
    config: ImageDefaults


def fetch_oci_rootfs(
    ref: str,
    auth: RegistryAuth | None,
    cache_dir: Path,
    progress: Progress,
    *,
    inspect_timeout_s: float = INSPECT_TIMEOUT_S,
) -> OciBase:
    """The root filesystem of image `ref`, from the cache when its digest is there."""
    source = parse_image_source(ref)
    require_oci_tools()
    _check_local_source(ref, source)
    _check_no_colon(cache_dir, "the build cache directory")
    progress.stage(f"fetching image {ref}")
    digest = _inspect_digest(ref, source, auth, inspect_timeout_s)
    name = f"oci-{digest.replace(':', '-')}"  # a ':' would split overlayfs' lowerdir lists
    entry = cache_dir / name
    with locked(cache_dir / f".{name}.lock"):
        if (entry / "rootfs").is_dir():
            progress.note(f"image {ref} cached ({digest[:19]})")
            return OciBase(entry / "rootfs", digest, _read_defaults(entry / CONFIG_FILE))
        if os.geteuid() != 0:
            raise PrerequisiteMissing(
                "unpacking an OCI image with its files' owners needs root; build as root"
            )
        work = entry.with_name(f"{name}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            layout = work / "layout"
            _copy(ref, source.pinned(digest), layout, auth, progress)
            (work / CONFIG_FILE).write_bytes(_config_blob(layout, LAYOUT_TAG))
            _unpack(ref, layout, work / "rootfs", progress)
            shutil.rmtree(layout)
            if entry.exists():  # left without a rootfs by hand: nothing there to keep
                shutil.rmtree(entry)
            work.rename(entry)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return OciBase(entry / "rootfs", digest, _read_defaults(entry / CONFIG_FILE))


def write_oci_archive(
    rootfs: Path, archive: Path, tag: str = "latest", config: ImageDefaults | None = None
) -> str:
    """Write the tree at `rootfs` (owners, modes and all) as a single-layer OCI archive
    tagged `tag`; returns the digest of its manifest. The archive appears whole or not at
    all."""
    require_oci_tools()
    if not TAG_RE.fullmatch(tag):
        raise InvalidRequest(
            f"{tag!r} is not an OCI tag: letters, digits, '_', '.', '-' (128 at most), "
            "not starting with '.' or '-'"
        )
    if not rootfs.is_dir():
        raise TemplateBuildError(f"{rootfs} is not a directory to make an image of")
    archive = archive.absolute()
    _check_no_colon(archive, "the archive's path")
    archive.parent.mkdir(parents=True, exist_ok=True)
    # Beside the archive, so that the finished one is renamed into place on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{archive.name}.", dir=archive.parent) as tmp:
        layout = Path(tmp) / "layout"
        image = f"{layout}:{tag}"
        partial = Path(tmp) / "image.tar"
        digest_file = Path(tmp) / "digest"
        steps: list[list[str]] = [
            ["umoci", "init", f"--layout={layout}"],
            ["umoci", "new", f"--image={image}"],
            # Target "." rather than "/": the layer's names come out relative (`bin/sh`), as
            # in Docker's own layers; "/" would make the root entry an absolute name.
            ["umoci", "insert", f"--image={image}", str(rootfs.absolute()), "."],
        ]
        if config is not None and config != ImageDefaults():
            steps.append(["umoci", "config", f"--image={image}", *umoci_config_args(config)])
        steps.append(
            # The host's signature policy is for images coming in; this one was made here
            # and a moment ago, so there is nothing to verify.
            [
                "skopeo",
                "copy",
                "--insecure-policy",
                f"--digestfile={digest_file}",
                f"oci:{layout}:{tag}",
                f"oci-archive:{partial}:{tag}",
            ]
        )
        for argv in steps:
            done = stream(argv, SilentProgress())
            if not done.ok:
                raise TemplateBuildError(
                    f"writing the OCI archive {archive} failed at `{argv[0]} {argv[1]}` "
                    f"(exit {done.returncode}): {_reason(done)}"
                )
        partial.rename(archive)
        return digest_file.read_text().strip()


def registry_failure(ref: str, source: ImageSource, done: Finished) -> CoppiceError:
    """The error for a failed `skopeo inspect` or `skopeo copy`, saying what to do."""
    reason = _reason(done)
    low = reason.lower()
    if "policy.json" in low:
        return PrerequisiteMissing(
            f"skopeo has no signature policy ({reason}); run scripts/setup, which installs it"
        )
    if "invalid reference format" in low:
        return TemplateBuildError(f"{ref!r} is not an image reference ({reason})", BASE_STEP)
    if source.is_registry and (done.timed_out or any(m in low for m in UNREACHABLE_MARKS)):
        why = "no answer in time" if done.timed_out else reason
        return TemplateBuildError(
            f"cannot reach the registry of image {ref} ({why}). {OFFLINE_HINT}", BASE_STEP
        )
    if source.is_registry and any(m in low for m in UNAUTHORIZED_MARKS):
        return TemplateBuildError(
            f"the registry refused image {ref} ({reason}); check that the image exists and "
            "that the registry's username and password (fromImageRegistry) are right",
            BASE_STEP,
        )
    return TemplateBuildError(f"cannot read image {ref}: {reason}", BASE_STEP)


def _reason(done: Finished) -> str:
    """skopeo's own words (its `msg="..."`), or the tool's last lines."""
    for line in reversed(done.lines):
        m = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
        if m:
            said = m.group(1).replace('\\"', '"').replace("\\\\", "\\")
            # The image is named in Coppice's own message already.
            return re.sub(r'^Error parsing image name "[^"]*": ', "", said)
    return done.tail()


def _check_local_source(ref: str, source: ImageSource) -> None:
    path = source.local_path
    if path is None:
        return
    want_dir = source.transport == "oci"
    if not path.exists():
        kind = "OCI layout directory" if want_dir else "archive"
        raise TemplateBuildError(
            f"image {ref}: {path} does not exist; give the path of an existing {kind} "
            f"(make one elsewhere with `skopeo copy docker://NAME {source.transport}:{path}`)",
            BASE_STEP,
        )
    if want_dir != path.is_dir():
        wanted = "a directory (an OCI layout)" if want_dir else "a file (an archive)"
        raise TemplateBuildError(f"image {ref}: {path} is not {wanted}", BASE_STEP)


def _check_no_colon(path: Path, what: str) -> None:
    # skopeo reads `oci:PATH:TAG` up to the first ':' as the path.
    if ":" in str(path):
        raise TemplateBuildError(
            f"{what} {path} has a ':' in it, which skopeo reads as the start of a tag; "
            "use a path without one"
        )


def _creds(flag: str, auth: RegistryAuth | None, source: ImageSource) -> list[str]:
    """skopeo takes credentials only on its command line. They never appear in what
    Coppice logs or raises: errors name the image, not the command, and the password is
    cut out of the tools' output."""
    if auth is None or not source.is_registry:
        return []
    return [f"{flag}={auth.username}:{auth.password}"]


def _secret(auth: RegistryAuth | None) -> str | None:
    return auth.password if auth is not None else None


def _inspect_digest(
    ref: str, source: ImageSource, auth: RegistryAuth | None, timeout_s: float
) -> str:
    # --raw: the manifest's exact bytes, one request, and no listing of every tag of the
    # repository (which plain `inspect` does, slowly for big ones).
    argv = [
        "skopeo",
        f"--command-timeout={max(1, int(timeout_s))}s",
        "inspect",
        "--raw",
        *_creds("--creds", auth, source),
        source.skopeo_name(),
    ]
    # The backstop outlives skopeo's own timeout, so that skopeo gets to say why.
    done = capture(argv, secret=_secret(auth), timeout_s=timeout_s + 10)
    if not done.ok or not done.stdout:
        raise registry_failure(ref, source, done)
    return "sha256:" + hashlib.sha256(done.stdout).hexdigest()


def _copy(
    ref: str,
    source: ImageSource,
    layout: Path,
    auth: RegistryAuth | None,
    progress: Progress,
) -> None:
    argv = [
        "skopeo",
        "copy",
        *_creds("--src-creds", auth, source),
        source.skopeo_name(),
        f"oci:{layout}:{LAYOUT_TAG}",
    ]
    done = stream(argv, progress, secret=_secret(auth))
    if done.ok:
        return
    if _disk_full(done):
        raise TemplateBuildError(
            f"fetching image {ref} failed: the disk is full; free space under {layout.parents[1]}",
            step=BASE_STEP,
            log_tail=done.lines,
        )
    # The registry answered the inspect a moment ago, but may not any more.
    raise registry_failure(ref, source, done)


def _unpack(ref: str, layout: Path, rootfs: Path, progress: Progress) -> None:
    # `raw unpack` writes the root filesystem only; `umoci unpack` would add a runtime
    # bundle (config.json, an mtree for repack) that nothing here uses.
    argv = ["umoci", "raw", "unpack", f"--image={layout}:{LAYOUT_TAG}", str(rootfs)]
    done = stream(argv, progress)
    if not done.ok:
        hint = (
            f"; the disk is full: free space under {rootfs.parents[1]}" if _disk_full(done) else ""
        )
        raise TemplateBuildError(
            f"unpacking image {ref} failed (umoci, exit {done.returncode}){hint}: {done.tail()}",
            step=BASE_STEP,
            log_tail=done.lines,
        )


def _disk_full(done: Finished) -> bool:
    return any("no space left on device" in line.lower() for line in done.lines)


def _config_blob(layout: Path, tag: str) -> bytes:
    """The image config of `tag` in an OCI layout, as the image-layout spec lays it out:
    index.json names the manifest, the manifest names the config, both are blobs."""
    index = _json(layout / "index.json")
    for desc in index.get("manifests", []):
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = _json(_blob(layout, desc["digest"]))
            return _blob(layout, manifest["config"]["digest"]).read_bytes()
    raise TemplateBuildError(f"the OCI layout {layout} has no image tagged {tag}")


def _blob(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def _json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise TemplateBuildError(f"{path} is not a JSON object")
    return data


def _read_defaults(path: Path) -> ImageDefaults:
    return image_defaults(_json(path))
