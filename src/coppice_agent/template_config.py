"""The template's own settings, as the template builder writes them into every image at
`/etc/coppice/template.json`: the user, workdir and env vars the template ended with (the
defaults of every sandbox command), and its start and ready commands.

A missing file is a template from before this file existed: today's defaults, no start
command. A malformed one is reported in the agent's log (which the host serves as the
sandbox's logs) and ignored as a whole: half of a config applied would be harder to explain
than none of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PATH = Path("/etc/coppice/template.json")
#: points the agent at another file (tests; an operator debugging a template)
PATH_VARIABLE = "COPPICE_TEMPLATE_CONFIG"
#: overrides the file's `ready_timeout_s`
READY_TIMEOUT_VARIABLE = "COPPICE_READY_TIMEOUT_S"
DEFAULT_USER = "user"
DEFAULT_READY_TIMEOUT_S = 120.0


class InvalidTemplateConfig(ValueError):
    pass


@dataclass(frozen=True)
class TemplateConfig:
    user: str = DEFAULT_USER
    #: None: the user's home, as before templates had a workdir
    workdir: str | None = None
    envs: Mapping[str, str] = field(default_factory=dict)
    start_cmd: str | None = None
    ready_cmd: str | None = None
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    #: start the default Python kernel before the sandbox is frozen (else on first use)
    warm_kernel: bool = True

    @classmethod
    def from_json(cls, raw: Any) -> TemplateConfig:
        """Raises InvalidTemplateConfig naming the first field that is wrong. Keys it does not
        know are ignored, so that a newer builder's file still starts an older agent."""
        if not isinstance(raw, dict):
            raise InvalidTemplateConfig(f"expected a JSON object, not {type(raw).__name__}")
        user = raw.get("user", DEFAULT_USER)
        if not isinstance(user, str) or not user:
            raise InvalidTemplateConfig(f"'user' must be a non-empty string, not {user!r}")
        workdir = raw.get("workdir")
        if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
            raise InvalidTemplateConfig(f"'workdir' must be an absolute path, not {workdir!r}")
        envs = raw.get("envs") or {}
        if not isinstance(envs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in envs.items()
        ):
            raise InvalidTemplateConfig("'envs' must map strings to strings")
        warm_kernel = raw.get("warm_kernel", True)
        if not isinstance(warm_kernel, bool):
            raise InvalidTemplateConfig(f"'warm_kernel' must be true or false, not {warm_kernel!r}")
        return cls(
            user=user,
            workdir=workdir,
            envs=dict(envs),
            start_cmd=_optional_command(raw, "start_cmd"),
            ready_cmd=_optional_command(raw, "ready_cmd"),
            ready_timeout_s=_timeout(raw.get("ready_timeout_s", DEFAULT_READY_TIMEOUT_S)),
            warm_kernel=warm_kernel,
        )


def _optional_command(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTemplateConfig(f"{key!r} must be a string or null, not {value!r}")
    # E2B treats an empty command as none at all.
    return value if value.strip() else None


def _timeout(value: Any) -> float:
    # bool is an int to Python, and `true` seconds is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTemplateConfig(f"'ready_timeout_s' must be a number, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidTemplateConfig(f"'ready_timeout_s' must be positive, not {value!r}")
    return float(value)


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(PATH_VARIABLE) or DEFAULT_PATH)


def load(path: Path, environ: Mapping[str, str] = os.environ) -> TemplateConfig:
    """The config in `path`; the defaults when it is missing or malformed (logged)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        config = TemplateConfig()
    except (OSError, UnicodeDecodeError) as exc:
        log.error("cannot read the template config %s (%s); using the defaults", path, exc)
        config = TemplateConfig()
    else:
        try:
            config = TemplateConfig.from_json(json.loads(text))
        except (ValueError, RecursionError) as exc:  # InvalidTemplateConfig and JSON errors
            log.error(
                "the template config %s is malformed: %s; using the defaults: user %r, "
                "the user's home, no env vars, no start or ready command",
                path,
                exc,
                DEFAULT_USER,
            )
            config = TemplateConfig()
    return _with_timeout_override(config, environ)


def _with_timeout_override(config: TemplateConfig, environ: Mapping[str, str]) -> TemplateConfig:
    override = environ.get(READY_TIMEOUT_VARIABLE)
    if not override:
        return config
    try:
        timeout = _timeout(float(override))
    except (ValueError, InvalidTemplateConfig):
        log.error(
            "%s=%r is not a positive number of seconds; keeping %g s",
            READY_TIMEOUT_VARIABLE,
            override,
            config.ready_timeout_s,
        )
        return config
    return dataclasses.replace(config, ready_timeout_s=timeout)
