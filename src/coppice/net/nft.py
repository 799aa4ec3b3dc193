"""Loading nftables scripts: one `nft -f -` per call, so each script is one transaction that
applies whole or not at all."""

from __future__ import annotations

import shutil
import subprocess

from coppice.errors import PrerequisiteMissing, SubstrateError


def load(script: str, what: str) -> None:
    """Apply `script` atomically; SubstrateError naming `what` when nft refuses it."""
    if not script:
        return
    if shutil.which("nft") is None:
        raise PrerequisiteMissing("nft is not installed (package nftables); run scripts/setup")
    done = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SubstrateError(f"cannot {what}: {done.stderr.strip()}")


def has_table(family: str, table: str) -> bool:
    done = subprocess.run(
        ["nft", "list", "table", family, table], capture_output=True, text=True, check=False
    )
    return done.returncode == 0
