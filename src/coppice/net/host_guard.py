"""The host's own door, closed to sandboxes: an nftables table per bridge that drops every
connection a sandbox opens towards the host, while the host's connections into sandboxes
(and their answers) pass.

Isolated bridge ports and disabled forwarding already keep sandboxes from reaching each
other and the world; this closes the last way out, the host's own services (its sshd, a
gateway bound to 0.0.0.0, anything listening on the bridge address).
"""

from __future__ import annotations

import re
import shutil
import subprocess

from coppice.errors import PrerequisiteMissing, SubstrateError


def table_name(bridge: str) -> str:
    return "coppice_guard_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def ruleset(bridge: str) -> str:
    """Loaded as one nft transaction: create-if-missing, delete, recreate, so a reload
    replaces the table atomically and never leaves the host open in between."""
    table = table_name(bridge)
    return (
        f"table inet {table} {{}}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f'    iifname "{bridge}" ct state established,related accept\n'
        f'    iifname "{bridge}" counter drop\n'
        "  }\n"
        "}\n"
    )


def _nft(script: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("nft") is None:
        raise PrerequisiteMissing("nft is not installed (package nftables); run scripts/setup")
    return subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
    )


class HostGuard:
    def __init__(self, bridge: str) -> None:
        self.bridge = bridge

    def ensure(self) -> None:
        done = _nft(ruleset(self.bridge))
        if done.returncode != 0:
            raise SubstrateError(
                f"cannot install the firewall table for {self.bridge}: {done.stderr.strip()}"
            )

    def remove(self) -> None:
        table = table_name(self.bridge)
        done = _nft(f"table inet {table} {{}}\ndelete table inet {table}\n")
        if done.returncode != 0:
            raise SubstrateError(f"cannot remove firewall table {table}: {done.stderr.strip()}")

    def installed(self) -> bool:
        done = subprocess.run(
            ["nft", "list", "table", "inet", table_name(self.bridge)],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.returncode == 0
