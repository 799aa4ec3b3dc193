"""The instance's lxcfs: what repairs a found state, and how a jail shows its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from coppice.substrates.lxcfs import (
    PROC_FILES,
    LxcfsDaemon,
    MountState,
    Repair,
    proc_binds,
    repair_plan,
)


@pytest.mark.parametrize(
    ("running", "mount", "steps"),
    [
        (True, MountState.LIVE, ()),
        # something else serves the mount point: jails are bound to it, so it stays
        (False, MountState.LIVE, ()),
        (False, MountState.ABSENT, (Repair.START,)),
        (False, MountState.DEAD, (Repair.DETACH, Repair.START)),
        (True, MountState.ABSENT, (Repair.STOP, Repair.START)),
        (True, MountState.DEAD, (Repair.STOP, Repair.DETACH, Repair.START)),
    ],
)
def test_repair_plan(running: bool, mount: MountState, steps: tuple[Repair, ...]) -> None:
    assert repair_plan(running, mount) == steps


def test_every_plan_ends_serving() -> None:
    for running in (True, False):
        for mount in MountState:
            plan = repair_plan(running, mount)
            assert mount is MountState.LIVE or plan[-1] is Repair.START


def test_proc_binds_cover_the_virtualised_files_read_only() -> None:
    argv = proc_binds(Path("/run/coppice/lxcfs"))
    assert argv[:3] == ["--ro-bind", "/run/coppice/lxcfs/proc/cpuinfo", "/proc/cpuinfo"]
    triples = [argv[i : i + 3] for i in range(0, len(argv), 3)]
    assert {t[0] for t in triples} == {"--ro-bind"}
    assert [t[2] for t in triples] == [f"/proc/{name}" for name in PROC_FILES]
    assert {"meminfo", "cpuinfo", "stat", "uptime", "loadavg"} <= set(PROC_FILES)


def test_a_pidfile_naming_another_process_is_no_daemon(tmp_path: Path) -> None:
    daemon = LxcfsDaemon(tmp_path)
    assert daemon.daemon_pid() is None  # no pidfile
    daemon.pidfile.write_text("1\n")  # a live process whose command line is not ours
    assert daemon.daemon_pid() is None
    daemon.pidfile.write_text("not a pid\n")
    assert daemon.daemon_pid() is None


def test_nothing_mounted_reads_as_absent(tmp_path: Path) -> None:
    assert LxcfsDaemon(tmp_path).mount_state() is MountState.ABSENT
