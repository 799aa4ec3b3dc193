"""Snapshots of handed-out sandboxes, sandboxes started from them, and forks: the side
effects, performed around the store's decisions (`begin_capture`, `end_capture`) the way the
PoolController performs the lifecycle's.

A capture marks the source SNAPSHOTTING and writes the snapshot's row "making" in one
transaction (with the disk budget checked) before the driver writes anything, so a crash at
any point leaves a row reconcile finds: it removes the files and the row, and puts the
source back to running.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from coppice.errors import (
    Conflict,
    CoppiceError,
    NotSupportedOnSubstrate,
    SubstrateError,
)
from coppice.pool.controller import PoolController
from coppice.store.disk_budget import MB
from coppice.store.records import EntryRecord, SandboxRecord, SnapshotRecord
from coppice.store.store import Applied
from coppice.substrates.base import Substrate

log = logging.getLogger("coppice.pool")


@dataclass(frozen=True)
class ForkOutcome:
    """One fork: the entry handed out for it, or why it did not start."""

    entry: EntryRecord | None = None
    error: CoppiceError | None = None


def keeps_memory(sub: Substrate, asked: bool | None) -> bool:
    """Whether a capture keeps memory: as asked, or (not asked) whatever the substrate can.
    Asking for memory where the substrate keeps none is refused, not quietly downgraded."""
    can = sub.persistence.memory_in_snapshots
    if asked is None:
        return can
    if asked and not can:
        raise NotSupportedOnSubstrate(
            "a snapshot that keeps memory",
            sub.name,
            "its snapshots keep the files; ask without memory (mode='filesystem')",
        )
    return asked


class SnapshotController:
    def __init__(self, controller: PoolController) -> None:
        self.controller = controller
        self.store = controller.store
        self.settings = controller.settings

    @property
    def budget_bytes(self) -> int:
        return self.settings.snapshot_disk_mb * MB

    def _path_of(self, snapshot_id: str) -> Path:
        return self.settings.snapshots_dir / snapshot_id

    # -- capture ------------------------------------------------------------------------------

    def take(
        self,
        source_id: str,
        tenant: str,
        name: str | None,
        keep_memory: bool | None,
        purpose: str = "snapshot",
    ) -> SnapshotRecord:
        """Capture the running sandbox `source_id`; it runs again afterwards, whatever
        happened. A snapshot is ready and listed when this returns; a fork's capture stays
        "making" for `fork` to start from and delete."""
        entry = self.store.get(source_id)
        sub = self.controller.substrate(entry.substrate)
        keep = keeps_memory(sub, keep_memory)
        need = sub.footprint(entry.id, entry.handle, keep)
        started = self.store.begin_capture(
            source_id,
            tenant,
            purpose,
            "files+memory" if keep else "files",
            self._path_of,
            need,
            self.budget_bytes,
        )
        snapshot_id = started.snapshot.id
        directory = Path(started.snapshot.path)
        try:
            directory.mkdir(parents=True)
            artifact = sub.snapshot(entry.id, entry.handle, directory, keep)
        except BaseException as exc:
            with contextlib.suppress(CoppiceError, OSError):
                sub.delete_snapshot(directory)
            applied, _ = self.store.end_capture(snapshot_id, None)
            self._thaw(applied)
            if isinstance(exc, OSError):
                raise SubstrateError(f"snapshot of {source_id} failed: {exc}") from exc
            raise
        applied, record = self.store.end_capture(snapshot_id, artifact, name)
        self._thaw(applied)
        assert record is not None
        return record

    def _thaw(self, applied: Applied | None) -> None:
        """Carry out the capture's end (its source runs again); a source that died during
        the capture is left to the keeper's watch, which records why."""
        if applied is not None:
            with contextlib.suppress(CoppiceError):
                self.controller.perform(applied)

    # -- from a snapshot ----------------------------------------------------------------------

    def start_from(self, snapshot: SnapshotRecord, sandbox: SandboxRecord) -> EntryRecord:
        """A new sandbox from the snapshot, handed straight to `sandbox` (no pool holds
        snapshots); the caller holds a spawn slot for it, as for a cold start."""
        if snapshot.state != "ready" or snapshot.artifact is None:
            raise Conflict(f"snapshot {snapshot.id} is still being made; try again when it is")
        return self.controller.start_cold(snapshot.template, sandbox, snapshot.artifact)

    def fork(
        self, source_id: str, tenant: str, sandboxes: list[SandboxRecord]
    ) -> list[ForkOutcome]:
        """Capture the source once (it keeps running), start one sandbox per record from
        the capture, each independently, and delete the capture. A failure of the capture
        fails the whole fork; a failure of one fork is that fork's outcome."""
        capture = self.take(source_id, tenant, None, None, purpose="fork")
        assert capture.artifact is not None
        artifact = capture.artifact
        sub = self.controller.substrate(capture.substrate)
        try:
            workers = max(1, min(len(sandboxes), sub.spawn_parallelism))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fork") as pool:
                futures = [
                    pool.submit(self.controller.start_cold, capture.template, record, artifact)
                    for record in sandboxes
                ]
                outcomes = []
                for future in futures:
                    try:
                        outcomes.append(ForkOutcome(entry=future.result()))
                    except CoppiceError as exc:
                        outcomes.append(ForkOutcome(error=exc))
            return outcomes
        finally:
            # The forks copied what they need: the capture is no longer wanted.
            self._delete_files_and_row(capture)

    # -- delete -------------------------------------------------------------------------------

    def delete(self, snapshot: SnapshotRecord) -> None:
        """Remove a ready snapshot's files and its row; sandboxes started from it keep
        running (they copied what they needed)."""
        if snapshot.state != "ready":
            raise Conflict(f"snapshot {snapshot.id} is being made; delete it once it is ready")
        self._delete_files_and_row(snapshot)

    def _delete_files_and_row(self, snapshot: SnapshotRecord) -> None:
        # Files first: a crash in between leaves a row (or a directory) reconcile removes.
        self.controller.substrate(snapshot.substrate).delete_snapshot(Path(snapshot.path))
        self.store.delete_snapshot(snapshot.id)
