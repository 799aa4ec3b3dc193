"""Which languages this sandbox's code interpreter speaks: its installed Jupyter kernelspecs.

Python is always there (the agent's own kernel, see kernels.DEFAULT_KERNEL_ARGV); every other
language is whatever kernelspec the template (or the user, later) installed, found by
jupyter_client's KernelSpecManager in the system-wide kernel directories and the default
user's own, and named by the spec's `language`. So a template that installs a Julia kernel
answers `language="julia"` with no change here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.paths import jupyter_path

log = logging.getLogger(__name__)

PYTHON = "python"
#: what the SDKs and people also call a language (E2B's `js`, `ts`, `sh`)
_ALIASES: Mapping[str, str] = {
    "python3": PYTHON,
    "js": "javascript",
    "node": "javascript",
    "ts": "typescript",
    "sh": "bash",
    "shell": "bash",
}
#: where several kernelspecs have one language, the one to take (else the name that is the
#: language itself, else the first by name)
_PREFERRED: Mapping[str, str] = {"r": "ir", "typescript": "tslab"}


def canonical_language(name: str) -> str:
    """`JS` → `javascript`; a name without an alias only loses case and blanks."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


@dataclass(frozen=True)
class LanguageKernel:
    """One installed kernelspec, as the kernel manager needs it to start the kernel."""

    language: str
    name: str
    argv: tuple[str, ...]
    display_name: str
    resource_dir: str
    env: Mapping[str, str] = field(default_factory=dict)
    interrupt_mode: str = "signal"

    @classmethod
    def from_spec(cls, name: str, resource_dir: str, spec: Mapping[str, Any]) -> LanguageKernel:
        return cls(
            language=canonical_language(str(spec.get("language") or name)),
            name=name,
            argv=tuple(str(a) for a in spec.get("argv") or ()),
            display_name=str(spec.get("display_name") or name),
            resource_dir=resource_dir,
            env={str(k): str(v) for k, v in (spec.get("env") or {}).items()},
            interrupt_mode=str(spec.get("interrupt_mode") or "signal"),
        )


class KernelCatalog:
    """Reads the kernelspecs on every call: a kernel the user installs while the sandbox runs
    (`python -m bash_kernel.install --user`) is usable at once, and a few small JSON files
    cost far less than the kernel start that follows."""

    def __init__(self, kernel_dirs: Sequence[str] | None = None) -> None:
        """`kernel_dirs`: where to look; None: Jupyter's own search path (JUPYTER_PATH, the
        interpreter's prefix, /usr/local/share/jupyter, /usr/share/jupyter)."""
        self._kernel_dirs = None if kernel_dirs is None else tuple(kernel_dirs)

    def _dirs(self, user_home: str | None) -> list[str]:
        dirs = list(self._kernel_dirs) if self._kernel_dirs is not None else jupyter_path("kernels")
        if user_home:
            # The agent runs as root with its own Jupyter data dir; the default user's
            # `--user` kernels live in their home, and take precedence as Jupyter's would.
            dirs.insert(0, os.path.join(user_home, ".local", "share", "jupyter", "kernels"))
        return dirs

    def kernels(self, user_home: str | None = None) -> dict[str, LanguageKernel]:
        """Language → the kernel that runs it, for every language but Python."""
        manager = KernelSpecManager(kernel_dirs=self._dirs(user_home), ensure_native_kernel=False)
        by_language: dict[str, list[LanguageKernel]] = {}
        for name, found in manager.get_all_specs().items():
            try:
                kernel = LanguageKernel.from_spec(name, found["resource_dir"], found["spec"])
            except (KeyError, TypeError, AttributeError, ValueError):
                log.warning("kernelspec %s is unreadable; skipped", name)
                continue
            if kernel.argv and kernel.language != PYTHON:
                by_language.setdefault(kernel.language, []).append(kernel)
        return {lang: min(found, key=_preference) for lang, found in by_language.items()}

    def languages(self, user_home: str | None = None) -> list[str]:
        """Every language a context can be created for, Python first."""
        return [PYTHON, *sorted(self.kernels(user_home))]


def _preference(kernel: LanguageKernel) -> tuple[int, str]:
    preferred = _PREFERRED.get(kernel.language, kernel.language)
    return (0 if kernel.name == preferred else 1, kernel.name)


class UnknownLanguage(LookupError):
    def __init__(self, requested: str, available: Sequence[str]) -> None:
        super().__init__(
            f"language {requested!r} is not supported in this sandbox; available: "
            + ", ".join(available)
        )


def resolve_language(
    catalog: KernelCatalog, language: str | None, user_home: str | None = None
) -> tuple[str, LanguageKernel | None]:
    """The canonical language and the kernelspec that runs it (None: the agent's own Python
    kernel). Raises UnknownLanguage, naming what this sandbox has instead."""
    if language is None or canonical_language(language) == PYTHON:
        return PYTHON, None
    name = canonical_language(language)
    kernels = catalog.kernels(user_home)
    if name not in kernels:
        raise UnknownLanguage(language, [PYTHON, *sorted(kernels)])
    return name, kernels[name]
