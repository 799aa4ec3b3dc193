"""What an OCI image's config says its containers start with (Env, WorkingDir, User,
Entrypoint, Cmd), read from the config blob and written back with `umoci config`.

The builder decides what to do with these: E2B's own defaults (`user` in `/home/user`) are
not the image's, so nothing here is applied on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coppice.errors import TemplateBuildError


@dataclass(frozen=True)
class ImageDefaults:
    """None and () mean the image says nothing about it."""

    #: in the image's order, a later duplicate replacing the earlier (as Docker does)
    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    @property
    def command(self) -> tuple[str, ...]:
        """What a container of the image runs: the entrypoint with Cmd as its arguments."""
        return self.entrypoint + self.cmd

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


def image_defaults(image_config: Mapping[str, Any]) -> ImageDefaults:
    """From an OCI image config (the JSON blob a manifest's `config` points at)."""
    raw = image_config.get("config") or {}
    if not isinstance(raw, Mapping):
        raise TemplateBuildError("the image's config has a malformed `config` object")
    env: dict[str, str] = {}
    for entry in _strings(raw.get("Env"), "Env"):
        # `NAME` without `=` only says "unset" in Docker's run-time syntax; an image has
        # nothing to unset, so it is dropped.
        name, eq, value = entry.partition("=")
        if eq and name:
            env.pop(name, None)
            env[name] = value
    return ImageDefaults(
        env=tuple(env.items()),
        workdir=_optional_string(raw.get("WorkingDir"), "WorkingDir"),
        user=_optional_string(raw.get("User"), "User"),
        entrypoint=_strings(raw.get("Entrypoint"), "Entrypoint"),
        cmd=_strings(raw.get("Cmd"), "Cmd"),
    )


def umoci_config_args(defaults: ImageDefaults) -> list[str]:
    """`umoci config` options that give a blank image these defaults. Always `--opt=value`:
    a value such as `-c` or `--help` would otherwise be read as an option."""
    args = [f"--config.env={name}={value}" for name, value in defaults.env]
    if defaults.workdir:
        args.append(f"--config.workingdir={defaults.workdir}")
    if defaults.user:
        args.append(f"--config.user={defaults.user}")
    args += [f"--config.entrypoint={part}" for part in defaults.entrypoint]
    args += [f"--config.cmd={part}" for part in defaults.cmd]
    return args


def _strings(value: object, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TemplateBuildError(f"the image's config has a malformed {field} (not strings)")
    return tuple(value)


def _optional_string(value: object, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TemplateBuildError(f"the image's config has a malformed {field} (not a string)")
    return value
