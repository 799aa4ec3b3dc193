"""Snapshots, forks and pauses of real QEMU sandboxes (TCG here) through the unmodified SDKs:
the memory is kept (a variable in the Python kernel, a background process), the files are,
each sandbox made from a snapshot has its own identity, and a paused VM is on disk only, so
it survives a gateway restart and a host reboot and keeps its id."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

from coppice.host.processes import ProcessIdentity
from coppice.net.tap import entry_tap_name
from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord
from coppice.substrates.vm import VmSubstrate

from .gateway_process import RestartableGateway, restartable, wait_for
from .kept_state import BACKGROUND, CHECK, STILL_RUNNING, WRITE

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def gateways(
    cli_env: dict[str, str],
    vm_template: TemplateRecord,
    controller: PoolController,
    instance_dir: Path,
) -> Iterator[RestartableGateway]:
    with restartable(
        cli_env, instance_dir / "gateway-vm-snapshots.log", {vm_template.name: 1}, controller.drain
    ) as gws:
        yield gws


def _identity(sbx: Sandbox) -> tuple[str, str]:
    out = sbx.commands.run("hostname; hostname -I").stdout.split()
    return out[0], out[1]


def test_a_vm_snapshot_keeps_memory_and_files(
    gateways: RestartableGateway, vm_template: TemplateRecord
) -> None:
    source = CodeSandbox.create(template=vm_template.name)
    made: CodeSandbox | None = None
    try:
        source.commands.run(WRITE)
        assert source.run_code("answer = 41 + 1").error is None
        info = source.create_snapshot()
        listed = Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()
        assert info.snapshot_id in [s.snapshot_id for s in listed]
        source.run_code("answer = 0")  # the snapshot keeps its own memory
        made = CodeSandbox.create(template=info.snapshot_id)
        assert made.run_code("answer").text == "42"  # memory, not a fresh kernel
        assert made.commands.run(CHECK).stdout == "kept\n"
        assert _identity(made) != _identity(source)
        assert source.run_code("answer").text == "0"
        assert Sandbox.delete_snapshot(info.snapshot_id) is True
        assert made.commands.run(CHECK).stdout == "kept\n"  # it does not depend on it
    finally:
        for sbx in (source, made):
            if sbx is not None:
                sbx.kill()


def test_a_files_only_vm_snapshot_is_refused_by_name(
    gateways: RestartableGateway, vm_template: TemplateRecord
) -> None:
    source = Sandbox.create(template=vm_template.name)
    try:
        with pytest.raises(Exception, match="snapshot without memory"):
            source.create_snapshot(mode="filesystem")
        assert source.commands.run("echo still").stdout == "still\n"
    finally:
        source.kill()


@pytest.mark.parametrize("count", [1, 5])
def test_vm_forks_have_the_source_s_memory_and_their_own_identity(
    gateways: RestartableGateway, vm_template: TemplateRecord, count: int
) -> None:
    source = Sandbox.create(template=vm_template.name)
    forks: list[Sandbox] = []
    try:
        source.commands.run(WRITE + " && " + BACKGROUND)
        # E2B gives a fork 15 s to live unless told; five TCG forks take longer to check.
        results = source.fork(count=count, timeout=300)
        forks = [f for f in results if isinstance(f, Sandbox)]
        assert len(forks) == count, results
        assert len({_identity(s) for s in [source, *forks]}) == count + 1
        for f in forks:
            assert f.commands.run(CHECK).stdout == "kept\n"
            assert f.commands.run(STILL_RUNNING).stdout == "running\n"
        # Random state is not shared: each fork was reseeded.
        draws = {f.commands.run("head -c 16 /dev/urandom | od -An -tx1").stdout for f in forks}
        assert len(draws) == count
        assert source.commands.run(CHECK).stdout == "kept\n"
    finally:
        for sbx in [source, *forks]:
            sbx.kill()


def test_a_files_only_pause_of_a_vm_is_refused_by_name(
    gateways: RestartableGateway, vm_template: TemplateRecord
) -> None:
    sbx = Sandbox.create(template=vm_template.name)
    try:
        with pytest.raises(Exception, match="files-only pause"):
            sbx.pause(keep_memory=False)
        assert sbx.commands.run("echo still").stdout == "still\n"
    finally:
        sbx.kill()


def _wait_gone(ident: ProcessIdentity) -> None:
    assert wait_for(lambda: not ident.is_running(), timeout_s=10)


def _simulate_reboot(controller: PoolController, keep: str) -> None:
    """What a reboot does to the vm substrate with the gateway stopped: every QEMU ends,
    /run and /dev/shm (the goldens' RAM) are emptied, the bridge and taps are gone; the
    state directory (database, disks, saved memory) stays."""
    vm = controller.substrates["vm"]
    assert isinstance(vm, VmSubstrate)
    for entry in controller.store.list_entries():
        if entry.substrate != "vm" or entry.id == keep:
            continue
        if entry.handle is not None and entry.handle.head is not None:
            ident = entry.handle.head.identity
            if ident.is_running():
                os.kill(ident.pid, signal.SIGKILL)
                _wait_gone(ident)
        shutil.rmtree(vm.entry_dir(entry.id), ignore_errors=True)
        vm.taps.remove(entry_tap_name(entry.id))
    for key in sorted(vm.goldens.keys()):
        vm.goldens.ram_file(key).unlink(missing_ok=True)
    vm.teardown_host()


def test_a_paused_vm_survives_a_gateway_restart_and_a_host_reboot(
    gateways: RestartableGateway, vm_template: TemplateRecord, controller: PoolController
) -> None:
    sbx = CodeSandbox.create(template=vm_template.name)
    try:
        sbx.commands.run(WRITE + " && " + BACKGROUND)
        assert sbx.run_code("answer = 42").error is None
        assert sbx.pause() is True
        entry = controller.store.get(sbx.sandbox_id)
        assert entry.handle is not None and entry.handle.head is None  # no QEMU: on disk
        gateways.restart()
        back = CodeSandbox.connect(sbx.sandbox_id)
        assert back.sandbox_id == sbx.sandbox_id
        assert back.run_code("answer").text == "42"
        assert back.commands.run(STILL_RUNNING).stdout == "running\n"

        assert back.pause() is True
        gateways.stop()
        _simulate_reboot(controller, keep=sbx.sandbox_id)
        gateways.start()
        again = CodeSandbox.connect(sbx.sandbox_id)
        assert again.sandbox_id == sbx.sandbox_id
        assert again.commands.run(CHECK).stdout == "kept\n"
        assert again.run_code("answer").text == "42"
        assert again.commands.run(STILL_RUNNING).stdout == "running\n"
    finally:
        # By id: `sbx` still points at the first gateway's port.
        Sandbox.kill(sbx.sandbox_id)
