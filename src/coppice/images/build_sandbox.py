"""What a build step runs in, as the builder sees it: a runner of shell commands over an
image root, with the image's own accounts. The runner itself (the jail substrate's
isolation, with only the host's package sources for a network) is
`coppice.substrates.build_jail`; the builder is handed a factory of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from coppice.config import Limits
from coppice.errors import TemplateBuildError


class BuildRunner(Protocol):
    def run(
        self,
        root: Path,
        command: str,
        user: Account,
        workdir: str,
        env: Mapping[str, str],
        on_line: Callable[[str], None],
        binds: Sequence[tuple[Path, str]] = (),
    ) -> tuple[int, tuple[str, ...]]:
        """Run `command` with /bin/sh as `user` in the image at `root`; its exit status and
        last lines of output. `binds`: host directories shown read-only inside."""


#: (limits, with the package-source network?) -> a runner for one build
SandboxFactory = Callable[[Limits, bool], AbstractContextManager[BuildRunner]]


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str


def lookup_account(root: Path, user: str) -> Account:
    """The image's own account named `user` (or numeric `uid[:gid]`), read from its
    /etc/passwd without following anything out of the image."""
    name, _, group = user.partition(":")
    passwd = _read_in_image(root, "etc/passwd")
    for line in passwd.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and (parts[0] == name or parts[2] == name):
            gid = int(parts[3])
            if group:
                gid = _group_id(root, group)
            return Account(parts[0], int(parts[2]), gid, parts[5] or "/")
    if name.isdigit():
        gid = int(group) if group.isdigit() else int(name)
        return Account(name, int(name), gid, "/")
    raise TemplateBuildError(
        f"user {name!r} does not exist in the image; create it in an earlier RUN step "
        f"(useradd {name}) or set USER to an existing one"
    )


def _group_id(root: Path, group: str) -> int:
    if group.isdigit():
        return int(group)
    for line in _read_in_image(root, "etc/group").splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[0] == group:
            return int(parts[2])
    raise TemplateBuildError(f"group {group!r} does not exist in the image")


def _read_in_image(root: Path, rel: str) -> str:
    # O_NOFOLLOW on every component would be exact; refusing symlinks on these two fixed
    # paths is enough, since nothing else is read from the image on the host.
    path = root / rel
    for part in (root / rel.split("/")[0], path):
        if part.is_symlink():
            raise TemplateBuildError(f"/{rel} in the image is a symlink; Coppice refuses it")
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
