"""What a vm sandbox uses, read from the host side (the guest is not asked).

- CPU: the QEMU process's own CPU time. Under TCG that is the guest's CPU time plus the
  cost of emulating it, which is what the sandbox costs the host.
- Memory: the guest RAM the clone has resident, from QEMU's mapping of it (the pages the
  guest has touched since its restore: shared with the golden until written, private
  after). It is not the guest kernel's own view of used memory (nothing of a page it frees
  goes back), and the page cache inside is not visible from here, so it is reported as 0.
- Disk: what the entry's disk file holds on the host plus what the golden's disk under it
  holds, at most the disk's size; the total is the disk's size.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from coppice.resource_usage import ResourceUsage, process_cpu_ticks
from coppice.substrates.vm_disk import allocated_bytes

DELETED = " (deleted)"


def mapping_rss(smaps: str, path: str, field: str = "Rss") -> int:
    """Resident bytes (or another of smaps' per-mapping sizes, such as Anonymous) of every
    mapping of `path` in a /proc/<pid>/smaps text (a mapping of a file unlinked since still
    counts)."""
    total = 0
    inside = False
    key = f"{field}:"
    for line in smaps.splitlines():
        first = line.split(maxsplit=1)[0] if line else ""
        if "-" in first and not first.endswith(":"):
            # A mapping's header: address range, perms, offset, device, inode, path.
            fields = line.split(maxsplit=5)
            name = fields[5] if len(fields) == 6 else ""
            inside = name.removesuffix(DELETED) == path
        elif inside and first == key:
            total += int(line.split()[1]) * 1024
    return total


def saved_memory_bound(smaps: str, ram_file: Path) -> int:
    """At most what a saved state of the guest's memory holds: a clone's RAM is the
    golden's file (its data, not its holes) plus the pages the clone wrote (its private,
    anonymous copies); RAM of a VM's own is what it has resident. Resident pages of the
    golden's file are no measure: a migration reads every page, holes included."""
    if ram_file.is_file():
        return allocated_bytes(ram_file) + mapping_rss(smaps, str(ram_file), "Anonymous")
    return mapping_rss(smaps, str(ram_file))


def read_usage(
    *,
    pid: int,
    ram_file: Path,
    memory_bytes: int,
    disk: Path,
    disk_backing: Path,
    disk_bytes: int,
) -> ResourceUsage | None:
    """None when the process or its disk is gone meanwhile."""
    try:
        ticks = process_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
        smaps = Path(f"/proc/{pid}/smaps").read_text()
        used = allocated_bytes(disk)
    except (OSError, IndexError, ValueError):
        return None
    # Gone when the golden was rebuilt or removed; the clone keeps its open file.
    with contextlib.suppress(OSError):
        used += allocated_bytes(disk_backing)
    return ResourceUsage(
        cpu_seconds=ticks / os.sysconf("SC_CLK_TCK"),
        mem_used=min(mapping_rss(smaps, str(ram_file)), memory_bytes),
        mem_cache=0,
        mem_total=memory_bytes,
        disk_used=min(used, disk_bytes),
        disk_total=disk_bytes,
    )
