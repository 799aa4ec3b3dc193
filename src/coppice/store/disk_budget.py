"""The disk budget of snapshots and files-only paused sandboxes (pure): does one more fit,
and if not, what to delete to make room. The store runs it inside the transaction that
records the new holder, so two captures deciding at once cannot both squeeze in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coppice.errors import DiskBudgetExceeded

MB = 1024 * 1024
#: holders an error lists at most (the largest first)
LISTED = 5


@dataclass(frozen=True)
class DiskHolder:
    """Something holding disk against the budget."""

    kind: str  # "snapshot" or "paused sandbox"
    id: str
    size_bytes: int

    def describe(self) -> str:
        return f"{self.kind} {self.id} ({_mb(self.size_bytes)} MB)"


def _mb(size: int) -> str:
    return f"{size / MB:.1f}" if size < 10 * MB else f"{size // MB}"


def check(holders: Sequence[DiskHolder], need_bytes: int, budget_bytes: int, what: str) -> None:
    """Raise DiskBudgetExceeded if `need_bytes` more would pass the budget, naming the
    fewest of the largest holders whose removal makes room."""
    held = sum(h.size_bytes for h in holders)
    if held + need_bytes <= budget_bytes:
        return
    head = (
        f"{what} needs {_mb(need_bytes)} MB, but snapshots and paused sandboxes hold "
        f"{_mb(held)} MB of the {_mb(budget_bytes)} MB budget (snapshot_disk_mb)"
    )
    if need_bytes > budget_bytes:
        raise DiskBudgetExceeded(f"{head}; it is larger than the whole budget: raise it")
    largest = sorted(holders, key=lambda h: (-h.size_bytes, h.id))
    chosen: list[DiskHolder] = []
    for holder in largest:
        if held - sum(h.size_bytes for h in chosen) + need_bytes <= budget_bytes:
            break
        chosen.append(holder)
    names = ", ".join(h.describe() for h in chosen[:LISTED])
    more = f" and {len(chosen) - LISTED} more" if len(chosen) > LISTED else ""
    raise DiskBudgetExceeded(
        f"{head}; delete {names}{more} (Sandbox.delete_snapshot(id) for a snapshot, kill "
        "for a paused sandbox), or raise snapshot_disk_mb"
    )
