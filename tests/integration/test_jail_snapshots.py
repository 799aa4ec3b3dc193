"""Snapshots, forks and files-only pauses of real jails, through the unmodified e2b SDK: the
files are there in every sandbox made from them, each with its own identity, and the
source is untouched."""

from __future__ import annotations

import time

import pytest
from e2b import Sandbox

from coppice.pool.controller import PoolController

from .gateway_process import GatewayProcess
from .kept_state import CHECK, WRITE

pytestmark = pytest.mark.integration


def _identity(sbx: Sandbox) -> tuple[str, str]:
    out = sbx.commands.run("hostname; hostname -I").stdout.split()
    return out[0], out[1]


def test_snapshot_then_sandboxes_from_it_hold_its_files(gateway: GatewayProcess) -> None:
    source = Sandbox.create()
    made: list[Sandbox] = []
    try:
        source.commands.run(WRITE)
        started = time.monotonic()
        info = source.create_snapshot()
        snapshot_s = time.monotonic() - started
        assert snapshot_s < 5, snapshot_s
        assert info.snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
        source.commands.run("echo changed-after > /home/user/note")  # the snapshot keeps its own
        for _ in range(2):
            made.append(Sandbox.create(info.snapshot_id))
        identities = {_identity(s) for s in [source, *made]}
        assert len(identities) == 3  # each its own hostname and address
        for sbx in made:
            assert sbx.commands.run(CHECK).stdout == "kept\n"
        assert source.commands.run("cat /home/user/note").stdout == "changed-after\n"
        assert Sandbox.delete_snapshot(info.snapshot_id) is True
        # Sandboxes made from it do not depend on it.
        assert made[0].commands.run(CHECK).stdout == "kept\n"
    finally:
        for sbx in [source, *made]:
            sbx.kill()


@pytest.mark.parametrize("count", [1, 5])
def test_fork_gives_copies_with_their_own_identity(gateway: GatewayProcess, count: int) -> None:
    source = Sandbox.create()
    forks: list[Sandbox] = []
    try:
        source.commands.run(WRITE)
        results = source.fork(count=count)
        forks = [f for f in results if isinstance(f, Sandbox)]
        assert len(forks) == count, results
        assert len({f.sandbox_id for f in forks} | {source.sandbox_id}) == count + 1
        assert len({_identity(s) for s in [source, *forks]}) == count + 1
        for f in forks:
            assert f.commands.run(CHECK).stdout == "kept\n"
        assert source.commands.run(CHECK).stdout == "kept\n"  # still running, untouched
    finally:
        for sbx in [source, *forks]:
            sbx.kill()


def test_a_files_only_pause_keeps_id_and_files_and_frees_its_processes(
    gateway: GatewayProcess, controller: PoolController
) -> None:
    sbx = Sandbox.create()
    try:
        sbx.commands.run(WRITE)
        assert sbx.pause(keep_memory=False) is True
        entry = controller.store.get(sbx.sandbox_id)
        jail = controller.substrates["jail"]
        assert not jail.is_alive(entry.id, entry.handle)  # no process holds memory
        assert jail.has_files(entry.id, entry.handle)
        back = Sandbox.connect(sbx.sandbox_id)
        assert back.sandbox_id == sbx.sandbox_id
        assert back.commands.run(CHECK).stdout == "kept\n"
    finally:
        sbx.kill()
