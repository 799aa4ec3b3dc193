"""Checks a driver runs before it touches the host, each failing with the fix."""

from __future__ import annotations

import os
import shutil

from coppice.errors import PrerequisiteMissing


def require_root(substrate: str) -> None:
    if os.geteuid() != 0:
        raise PrerequisiteMissing(f"the {substrate} substrate needs root; run coppice as root")


def require_tools(tools: dict[str, str]) -> None:
    """`tools` maps each command to the Debian package that provides it."""
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            raise PrerequisiteMissing(
                f"{tool} is not installed; run scripts/setup (Debian package {package})"
            )
