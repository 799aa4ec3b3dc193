"""Who a request acts as and where its paths point. envd resolves relative paths against the
acting user's home and creates missing parent directories owned by that user, so the files the
SDK writes are usable by the processes it starts as the same user."""

from __future__ import annotations

import os
from pathlib import Path

from coppice_agent.environment import SandboxEnvironment
from coppice_agent.users import SandboxUser


def acting_user(env: SandboxEnvironment, name: str | None) -> SandboxUser:
    """The named user, or the sandbox's default user. Raises `UnknownUser`."""
    return env.user(name)


def resolve_path(path: str, user: SandboxUser) -> str:
    """An absolute, normalised path: `~` and relative paths start at the user's home."""
    if path == "~" or path.startswith("~/"):
        path = user.home + path[1:]
    # normpath, not resolve(): symlinks in the path are the caller's to follow or not.
    return os.path.normpath(Path(user.home, path))


def default_cwd(env: SandboxEnvironment, user: SandboxUser) -> str:
    """Where a command or kernel that names no cwd starts: the sandbox's default workdir (the
    template's), else the user's home; `/` when that is not a directory, since accounts like
    nobody have a home that does not exist. Blocks (a stat)."""
    cwd = resolve_path(env.default_workdir or user.home, user)
    return cwd if Path(cwd).is_dir() else "/"


def ensure_dirs(path: str, user: SandboxUser) -> None:
    """`mkdir -p path`, handing every directory it creates to `user`."""
    missing: list[Path] = []
    current = Path(path)
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(0o755)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue
        chown_to(str(directory), user)


def chown_to(path: str, user: SandboxUser) -> None:
    # Files the agent creates for itself already have the right owner.
    if not user.is_current:
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
