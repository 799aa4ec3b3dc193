"""Where a COPY step's files come from.

The SDK uploads, per COPY step, a tar archive of the matching files laid out relative to its
context directory, and names it by the hash of those files (`filesHash`). A Dockerfile build
and Coppice's own recipes read a context directory instead. Both answer the same question:
given a step, which directory holds its `src` paths.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tarfile
from pathlib import Path
from typing import Protocol

from coppice.errors import InvalidRequest, TemplateBuildError
from coppice.images.file_lock import locked

_HASH = re.compile(r"^[A-Za-z0-9_-]{8,128}$")


class BuildFiles(Protocol):
    def root_for(self, files_hash: str) -> Path:
        """A directory laid out as the build context was, holding the step's files."""


def check_files_hash(files_hash: str) -> str:
    if not _HASH.match(files_hash):
        raise InvalidRequest(f"files hash {files_hash!r} is not a hash")
    return files_hash


class UploadedFiles:
    """Archives uploaded through the build API, one `<hash>.tar` per COPY step's files,
    unpacked once on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def archive_path(self, files_hash: str) -> Path:
        return self.root / f"{check_files_hash(files_hash)}.tar"

    def is_present(self, files_hash: str) -> bool:
        return self.archive_path(files_hash).is_file()

    def root_for(self, files_hash: str) -> Path:
        archive = self.archive_path(files_hash)
        unpacked = self.root / f"{files_hash}.d"
        if unpacked.is_dir():
            return unpacked
        if not archive.is_file():
            raise TemplateBuildError(
                f"the files of a COPY step (hash {files_hash}) were never uploaded; "
                "build again with the SDK so that it uploads them"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self.root / f".{files_hash}.lock"):
            if unpacked.is_dir():
                return unpacked
            work = self.root / f"{files_hash}.d.tmp-{os.getpid()}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            try:
                # The SDK sends gzip or plain tar; "r:*" takes both.
                with tarfile.open(archive, "r:*") as tar:
                    tar.extractall(work, members=_safe_members(tar))  # noqa: S202 - members checked
            except (tarfile.TarError, OSError) as exc:
                shutil.rmtree(work, ignore_errors=True)
                raise TemplateBuildError(
                    f"the uploaded files {files_hash} are not a readable tar archive: {exc}"
                ) from exc
            work.rename(unpacked)
        return unpacked


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Regular files, directories and links, none written outside the archive's directory,
    with no owner taken from it. A symbolic link may point anywhere (it is read inside the
    image, never followed here), but nothing is written through one: a member below a link
    is refused. (tarfile's `data` filter, from Python 3.11.4 on, also refuses absolute
    links, which the SDK sends for symlinks it does not resolve; Debian 12 has 3.11.2.)"""
    safe = []
    links: set[str] = set()
    for member in tar.getmembers():
        name = posixpath.normpath(member.name)
        if name.startswith(("/", "../")) or name == "..":
            raise TemplateBuildError(f"the uploaded archive holds {member.name!r}, outside it")
        parents = {"/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)}
        if parents & links:
            raise TemplateBuildError(
                f"the uploaded archive writes {member.name!r} through a symbolic link"
            )
        if member.isdev() or member.isfifo():
            raise TemplateBuildError(f"the uploaded archive holds a device {member.name!r}")
        if member.issym():
            links.add(name)
        elif member.islnk():
            target = posixpath.normpath(member.linkname)
            if target.startswith(("/", "../")) or target == "..":
                raise TemplateBuildError(
                    f"the uploaded archive's hard link {member.name!r} points outside it"
                )
        member.uid = member.gid = 0
        member.uname = member.gname = "root"
        member.mode &= 0o7777 & ~0o6000  # never setuid/setgid from an upload
        safe.append(member)
    return safe


class ContextDir:
    """A build context on the host (a Dockerfile's directory, a recipe's files)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def root_for(self, files_hash: str) -> Path:
        return self.root


def hash_context_files(root: Path, src: str) -> str:
    """A content hash of what `src` (a path or glob relative to `root`) names, for COPY steps
    that come from a context directory rather than from the SDK."""
    h = hashlib.sha256(src.encode() + b"\0")
    matches = sorted(root.glob(src)) if any(c in src for c in "*?[") else [root / src]
    for match in matches:
        paths = [match, *sorted(match.rglob("*"))] if match.is_dir() else [match]
        for path in paths:
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            h.update(f"{rel}\0{st.st_mode:o}\0".encode())
            if path.is_symlink():
                h.update(str(path.readlink()).encode())
            elif path.is_file():
                h.update(path.read_bytes())
    return h.hexdigest()
