"""When the host booted, so that a record older than the boot can be told from one whose
processes merely ended: after a restart nothing a sandbox ran survives."""

from __future__ import annotations

from pathlib import Path

PROC_STAT = Path("/proc/stat")


def boot_time(stat: Path = PROC_STAT) -> float | None:
    """The boot time in unix seconds (`btime` of /proc/stat), None where it cannot be read."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    return parse_btime(text)


def parse_btime(text: str) -> float | None:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "btime" and value.strip().isdigit():
            return float(value)
    return None
