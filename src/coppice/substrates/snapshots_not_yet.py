"""The snapshot, fork and files-only-pause operations of a driver that does not have them
yet: each refuses by name (a 400 at the gateway), so nothing pretends to have kept what it
did not. A driver that gains the mechanism drops this base class and implements the
`Substrate` methods it stands for (see their contracts in `base.py`)."""

from __future__ import annotations

from pathlib import Path

from coppice.errors import NotSupportedOnSubstrate
from coppice.substrates.base import Handle, SnapshotArtifact, SpawnSpec


def files_only_pause_refused(substrate: str) -> NotSupportedOnSubstrate:
    """For a driver whose persistence says it has no files-only pause."""
    return NotSupportedOnSubstrate(
        "a files-only pause (keep_memory=False)",
        substrate,
        "pause with memory, which this substrate keeps on disk",
    )


class SnapshotsNotYet:
    name: str

    def _refuse(self, feature: str) -> NotSupportedOnSubstrate:
        return NotSupportedOnSubstrate(
            feature, self.name, "pause with memory (a freeze) and create from templates work"
        )

    def footprint(self, entry_id: str, handle: Handle | None, keep_memory: bool) -> int:
        raise self._refuse("measuring a snapshot")

    def snapshot(
        self, entry_id: str, handle: Handle | None, directory: Path, keep_memory: bool
    ) -> SnapshotArtifact:
        raise self._refuse("snapshots")

    def spawn_from_snapshot(self, spec: SpawnSpec, artifact: SnapshotArtifact) -> Handle:
        raise self._refuse("sandboxes from snapshots")

    def stop_processes(self, entry_id: str, handle: Handle | None) -> None:
        raise self._refuse("a files-only pause (keep_memory=False)")

    def start_processes(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        raise self._refuse("resuming a files-only pause")

    def has_files(self, entry_id: str, handle: Handle | None) -> bool:
        # No files-only pause can exist on it, so reconcile buries a frozen sandbox that a
        # host reboot ended, as before: there is nothing kept to resume it on.
        return False

    def delete_snapshot(self, directory: Path) -> None:
        raise self._refuse("deleting snapshots")
