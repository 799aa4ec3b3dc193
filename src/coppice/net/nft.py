"""Loading nftables scripts: one `nft -f -` per call, so each script is one transaction that
applies whole or not at all."""

from __future__ import annotations

import shutil
import subprocess

from coppice.errors import PrerequisiteMissing, SubstrateError


def require() -> None:
    if shutil.which("nft") is None:
        raise PrerequisiteMissing("nft is not installed (package nftables); run scripts/setup")


def load(script: str, what: str) -> None:
    """Apply `script` atomically; SubstrateError naming `what` when nft refuses it."""
    if not script:
        return
    require()
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


def tables(family: str) -> list[str]:
    """Names of the host's tables of `family`; empty when nft cannot list them."""
    require()
    done = subprocess.run(
        ["nft", "list", "tables", family], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return []
    prefix = f"table {family} "
    return [line.removeprefix(prefix).strip() for line in done.stdout.splitlines() if line]
