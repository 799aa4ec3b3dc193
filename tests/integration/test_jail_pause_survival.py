"""Pauses of real jails across a gateway restart and a simulated host reboot, and a gateway
killed (SIGKILL) in the middle of a snapshot or a fork, through the unmodified e2b SDK.

A jail's memory pause is a cgroup freeze: it survives the gateway's restart, and a host
reboot turns it into a files-only pause (its processes are gone, its files are not). Either
way the sandbox keeps its id, and `connect` resumes it on its files."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2b import Sandbox

from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord

from .gateway_process import RestartableGateway, restartable, wait_for
from .kept_state import BACKGROUND, CHECK, STILL_RUNNING, WRITE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateways(
    cli_env: dict[str, str],
    base_template: TemplateRecord,
    controller: PoolController,
    instance_dir: Path,
) -> Iterator[RestartableGateway]:
    with restartable(
        cli_env, instance_dir / "gateway-jail-pauses.log", {base_template.name: 1}, controller.drain
    ) as gws:
        yield gws


def _simulate_reboot(controller: PoolController) -> None:
    """What a reboot does to the jail substrate with the gateway stopped: every process
    ends, every mount, link, cgroup and zygote is gone; the state directory (the database,
    the entries' disk images) stays."""
    jail = controller.substrates["jail"]
    for entry in controller.store.list_entries():
        if entry.substrate == "jail" and entry.state is not State.PAUSED_FILES:
            jail.stop_processes(entry.id, entry.handle)
    jail.teardown_host()


def _leftovers(controller: PoolController) -> tuple[set[str], list[str], list[str]]:
    """Host objects no entry owns, capture rows still "making", and snapshot directories
    no ready snapshot names."""
    live = {e.id for e in controller.store.list_entries()}
    owned = set()
    for sub in controller.substrates.values():
        owned |= sub.host_objects().all_ids()
    rows = controller.store.list_snapshots()
    making = [r.id for r in rows if r.state != "ready"]
    ready_dirs = {Path(r.path).name for r in rows if r.state == "ready"}
    snapshots_dir = controller.settings.snapshots_dir
    stray = sorted(
        p.name
        for p in (snapshots_dir.iterdir() if snapshots_dir.is_dir() else [])
        if p.name not in ready_dirs
    )
    return owned - live, making, stray


def test_paused_jails_survive_a_gateway_restart_and_a_host_reboot(
    gateways: RestartableGateway, controller: PoolController
) -> None:
    frozen, stopped = Sandbox.create(), Sandbox.create()
    try:
        for sbx in (frozen, stopped):
            sbx.commands.run(WRITE + " && " + BACKGROUND)
        assert frozen.pause() is True  # keep_memory: a freeze
        assert stopped.pause(keep_memory=False) is True
        assert controller.store.get(frozen.sandbox_id).state is State.PAUSED
        assert controller.store.get(stopped.sandbox_id).state is State.PAUSED_FILES

        gateways.restart()
        back = Sandbox.connect(frozen.sandbox_id)
        assert back.sandbox_id == frozen.sandbox_id
        assert back.commands.run(CHECK).stdout == "kept\n"
        assert back.commands.run(STILL_RUNNING).stdout == "running\n"  # the freeze held
        back_files = Sandbox.connect(stopped.sandbox_id)
        assert back_files.sandbox_id == stopped.sandbox_id
        assert back_files.commands.run(CHECK).stdout == "kept\n"
        assert back_files.commands.run(STILL_RUNNING).stdout == "gone\n"  # started afresh
        back_files.commands.run(BACKGROUND)

        assert back.pause() is True
        assert back_files.pause(keep_memory=False) is True
        gateways.stop()
        _simulate_reboot(controller)
        gateways.start()
        # The freeze did not outlive the reboot: reconcile kept its files as a files-only
        # pause, and connect starts it on them, as it does the other.
        assert controller.store.get(frozen.sandbox_id).state is State.PAUSED_FILES
        for sbx in (frozen, stopped):
            again = Sandbox.connect(sbx.sandbox_id)
            assert again.sandbox_id == sbx.sandbox_id
            assert again.commands.run(CHECK).stdout == "kept\n"
            assert again.commands.run(STILL_RUNNING).stdout == "gone\n"
    finally:
        # By id: the sandboxes still point at the first gateway's port.
        for sbx in (frozen, stopped):
            Sandbox.kill(sbx.sandbox_id)


def _crash_when(
    gateways: RestartableGateway, moment: Callable[[], bool], call: Callable[[], object]
) -> None:
    """Run `call` (an SDK request) and SIGKILL the gateway once `moment` holds; then start
    it again, which reconciles."""
    caller = threading.Thread(target=lambda: _ignore_errors(call), daemon=True)
    caller.start()
    try:
        assert wait_for(moment, timeout_s=60), "the request never reached the moment"
        gateways.kill()
    finally:
        caller.join(timeout=60)
    gateways.start()


def _ignore_errors(call: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):  # the gateway was killed under it: the point
        call()


#: a writable layer big enough that its copy takes a while
BIG_WRITE = (
    "head -c 400000000 /dev/zero | tr '\\0' x > /home/user/big && echo kept > /home/user/note"
)


@pytest.mark.parametrize("during", ["snapshot", "fork capture", "fork starts"])
def test_a_gateway_killed_mid_capture_leaves_nothing_half_made(
    gateways: RestartableGateway, controller: PoolController, during: str
) -> None:
    source = Sandbox.create()
    store = controller.store
    try:
        source.commands.run(BIG_WRITE, timeout=120)

        def capturing() -> bool:
            return store.get(source.sandbox_id).state is State.SNAPSHOTTING

        def starting_forks() -> bool:
            # the capture is done (the source runs again) and its row not yet deleted
            forking = any(r.purpose == "fork" for r in store.list_snapshots())
            return forking and store.get(source.sandbox_id).state is State.IN_USE

        if during == "snapshot":
            _crash_when(gateways, capturing, source.create_snapshot)
        else:
            moment = capturing if during == "fork capture" else starting_forks
            _crash_when(gateways, moment, lambda: source.fork(count=3))

        # The source is back to running, whatever was under way; reconcile removed the
        # half-made capture, its files and any fork that had not come up.
        again = Sandbox.connect(source.sandbox_id)
        assert again.commands.run("cat /home/user/note").stdout == "kept\n"
        assert store.get(source.sandbox_id).state is State.IN_USE
        assert wait_for(lambda: _leftovers(controller) == (set(), [], []), timeout_s=60), (
            _leftovers(controller)
        )
        listed = {s.sandbox_id for s in Sandbox.list().next_items()}
        for sandbox_id in listed - {source.sandbox_id}:
            # a fork that was already up is a whole sandbox, and answers
            assert Sandbox.connect(sandbox_id).commands.run("cat /home/user/note").stdout == (
                "kept\n"
            )
            Sandbox.kill(sandbox_id)
        assert not Sandbox.list_snapshots().next_items()
    finally:
        Sandbox.kill(source.sandbox_id)
