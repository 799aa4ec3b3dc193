"""Cgroup drivers against a FAKE cgroupfs: plain directories and files under tmp_path.

A plain directory cannot model the kernel: files do not appear on mkdir, writes are not
validated, the freezer does not change state on its own and rmdir of a directory holding files
fails. These tests therefore pre-create the control files the kernel would provide and check
only what the drivers read and write. Nothing here touches /sys/fs/cgroup or any process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coppice.config import Limits
from coppice.errors import PrerequisiteMissing, SubstrateError
from coppice.substrates.cgroups import (
    CPU_PERIOD_US,
    V1_CONTROLLERS,
    V1_VIEW_CONTROLLERS,
    CgroupV1,
    CgroupV2,
    OomCounters,
    _wait_for,
    detect,
)

PARENT = "coppice-test"


# -- fake trees -------------------------------------------------------------------------------


def fake_v2(root: Path, controllers: str = "cpuset cpu io memory hugetlb pids rdma") -> Path:
    """A unified hierarchy root with the parent cgroup already present (as after mkdir)."""
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    (root / PARENT).mkdir()
    (root / PARENT / "cgroup.subtree_control").write_text("\n")
    if "cpuset" in controllers.split():
        (root / PARENT / "cpuset.cpus.effective").write_text("0-3\n")
    return root


def fake_v2_child(root: Path, name: str, *, swap: bool = False, kill: bool = False) -> Path:
    """The files the kernel would create in a new child cgroup."""
    d = root / PARENT / name
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("")
    (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    (d / "cgroup.freeze").write_text("0\n")
    if swap:
        (d / "memory.swap.max").write_text("max\n")
    if kill:
        (d / "cgroup.kill").write_text("")
    return d


def fake_v1(root: Path) -> Path:
    for c in V1_CONTROLLERS:
        (root / c).mkdir()
    return root


def fake_v1_with_cpuset(root: Path, cpus: str = "0-3") -> Path:
    """A v1 host that also mounts cpuset and cpuacct; the parent cpuset as mkdir leaves it
    (no CPUs, no memory nodes)."""
    fake_v1(root)
    for c in V1_VIEW_CONTROLLERS:
        (root / c).mkdir()
    (root / "cpuset" / "cpuset.cpus").write_text(f"{cpus}\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    (root / "cpuset" / PARENT).mkdir()
    for key in ("cpuset.cpus", "cpuset.mems"):
        (root / "cpuset" / PARENT / key).write_text("\n")
    return root


# -- detect -----------------------------------------------------------------------------------


def test_detect_v2_on_fake_cgroupfs(tmp_path: Path) -> None:
    driver = detect(PARENT, fake_v2(tmp_path))
    assert isinstance(driver, CgroupV2)
    assert driver.version == 2
    assert driver.root == tmp_path
    assert driver.parent == PARENT


def test_detect_v1_on_fake_cgroupfs(tmp_path: Path) -> None:
    driver = detect(PARENT, fake_v1(tmp_path))
    assert isinstance(driver, CgroupV1)
    assert driver.version == 1


def test_detect_neither_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "cpu").mkdir()
    with pytest.raises(PrerequisiteMissing) as info:
        detect(PARENT, tmp_path)
    assert "pids" in str(info.value)
    assert "freezer" in str(info.value)
    assert "memory," not in str(info.value)


# -- v2 ---------------------------------------------------------------------------------------


def test_v2_prepare_enables_controllers_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    CgroupV2(PARENT, root).prepare()
    wanted = "+cpu +cpuset +memory +pids"
    assert (root / "cgroup.subtree_control").read_text() == wanted
    assert (root / PARENT / "cgroup.subtree_control").read_text() == wanted


def test_v2_prepare_without_cpuset_enables_the_rest_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, controllers="cpu io memory pids")
    CgroupV2(PARENT, root).prepare()
    assert (root / PARENT / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"


def test_v2_prepare_leaves_enabled_controllers_alone_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    (root / "cgroup.subtree_control").write_text("cpu cpuset io memory pids\n")
    (root / PARENT / "cgroup.subtree_control").write_text("cpu cpuset memory pids\n")
    CgroupV2(PARENT, root).prepare()
    assert (root / "cgroup.subtree_control").read_text() == "cpu cpuset io memory pids\n"
    assert (root / PARENT / "cgroup.subtree_control").read_text() == "cpu cpuset memory pids\n"


def test_v2_prepare_without_needed_controllers_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, controllers="cpuset io pids")
    with pytest.raises(PrerequisiteMissing) as info:
        CgroupV2(PARENT, root).prepare()
    assert "cpu, memory" in str(info.value)


def test_v2_create_writes_limits_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    cg = CgroupV2(PARENT, root)
    cg.create("e1", Limits(memory_mb=256, pids=64, cpus=1.5, disk_mb=1))
    d = root / PARENT / "e1"
    assert (d / "memory.max").read_text() == f"{256 * 1024 * 1024}\n"
    assert (d / "pids.max").read_text() == "64\n"
    assert (d / "cpu.max").read_text() == f"150000 {CPU_PERIOD_US}\n"
    # no memory.swap.max file (swap accounting off): nothing is written there
    assert not (d / "memory.swap.max").exists()
    assert not (d / "cpuset.cpus").exists()  # all of the parent's until placed
    cg.place_cpus("e1", 1.5)
    assert (d / "cpuset.cpus").read_text() == "0-1\n"  # 1.5 CPUs of time run on two
    assert cg.exists("e1")
    assert cg.join_files("e1") == [d / "cgroup.procs"]


def test_v2_create_spreads_cpusets_over_the_parents_cpus_on_fake_cgroupfs(
    tmp_path: Path,
) -> None:
    root = fake_v2(tmp_path)
    cg = CgroupV2(PARENT, root)
    for name in ("a", "b", "c", "d", "e"):
        cg.create(name, Limits(cpus=1.0))
        cg.place_cpus(name, 1.0)
    placed = [(root / PARENT / n / "cpuset.cpus").read_text() for n in "abcde"]
    assert placed == ["0\n", "1\n", "2\n", "3\n", "0\n"]


def test_v2_create_without_cpuset_writes_no_cpus_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, controllers="cpu io memory pids")
    cg = CgroupV2(PARENT, root)
    cg.create("e1", Limits())
    cg.place_cpus("e1", 1.0)
    assert not (root / PARENT / "e1" / "cpuset.cpus").exists()


def test_v2_create_turns_swap_off_when_the_kernel_offers_it_on_fake_cgroupfs(
    tmp_path: Path,
) -> None:
    root = fake_v2(tmp_path)
    fake_v2_child(root, "e1", swap=True)
    CgroupV2(PARENT, root).create("e1", Limits(cpus=0.25))
    d = root / PARENT / "e1"
    assert (d / "memory.swap.max").read_text() == "0\n"
    assert (d / "cpu.max").read_text() == "25000 100000\n"


def test_v2_names_pids_and_exists_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    cg = CgroupV2(PARENT, root)
    fake_v2_child(root, "a1")
    fake_v2_child(root, "b2")
    (root / PARENT / "a1" / "cgroup.procs").write_text("101\n202\n")
    assert cg.names() == {"a1", "b2"}  # control files of the parent are not cgroups
    assert cg.pids("a1") == [101, 202]
    assert cg.pids("b2") == []
    assert cg.pids("missing") == []
    assert cg.exists("a1")
    assert not cg.exists("missing")


def test_v2_names_without_parent(tmp_path: Path) -> None:
    assert CgroupV2(PARENT, tmp_path).names() == set()


def test_v2_freeze_and_thaw_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    d = fake_v2_child(root, "e1")
    cg = CgroupV2(PARENT, root)
    # the fake kernel has already reported the frozen state
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    cg.freeze("e1")
    assert (d / "cgroup.freeze").read_text() == "1\n"
    cg.thaw("e1")
    assert (d / "cgroup.freeze").read_text() == "0\n"


def test_v2_freeze_of_missing_cgroup_is_a_substrate_error(tmp_path: Path) -> None:
    with pytest.raises(SubstrateError, match="cannot write"):
        CgroupV2(PARENT, fake_v2(tmp_path)).freeze("missing")


def test_v2_kill_all_uses_cgroup_kill_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    d = fake_v2_child(root, "e1", kill=True)
    CgroupV2(PARENT, root).kill_all("e1", timeout_s=1.0)
    assert (d / "cgroup.kill").read_text() == "1\n"
    assert (d / "cgroup.freeze").read_text() == "0\n"  # no freeze needed


def test_v2_kill_all_without_cgroup_kill_freezes_then_thaws_on_fake_cgroupfs(
    tmp_path: Path,
) -> None:
    root = fake_v2(tmp_path)
    d = fake_v2_child(root, "e1")
    (d / "cgroup.events").write_text("populated 0\nfrozen 1\n")
    CgroupV2(PARENT, root).kill_all("e1", timeout_s=1.0)
    assert (d / "cgroup.freeze").read_text() == "0\n"


def test_v2_kill_all_of_missing_cgroup_is_a_no_op(tmp_path: Path) -> None:
    CgroupV2(PARENT, fake_v2(tmp_path)).kill_all("missing", timeout_s=0.1)


def test_v2_remove_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    cg = CgroupV2(PARENT, root)
    (root / PARENT / "empty").mkdir()
    cg.remove("empty")
    assert not cg.exists("empty")
    cg.remove("empty")  # already gone: fine
    # a plain directory holding files stands in for a busy cgroup the kernel refuses to remove
    fake_v2_child(root, "busy")
    with pytest.raises(SubstrateError, match="cannot remove cgroup"):
        cg.remove("busy")


def test_v2_remove_parent_on_fake_cgroupfs(tmp_path: Path) -> None:
    cg = CgroupV2(PARENT, tmp_path)
    (tmp_path / PARENT).mkdir()
    cg.remove_parent()
    assert not (tmp_path / PARENT).exists()
    cg.remove_parent()


# -- v1 ---------------------------------------------------------------------------------------


def test_v1_prepare_creates_the_parent_in_every_controller_on_fake_cgroupfs(
    tmp_path: Path,
) -> None:
    root = fake_v1(tmp_path)
    cg = CgroupV1(PARENT, root)
    cg.prepare()
    cg.prepare()  # idempotent
    for c in V1_CONTROLLERS:
        assert (root / c / PARENT).is_dir()
    cg.remove_parent()
    for c in V1_CONTROLLERS:
        assert not (root / c / PARENT).exists()


def test_v1_create_writes_limits_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    cg = CgroupV1(PARENT, root)
    cg.create("e1", Limits(memory_mb=128, pids=32, cpus=2.0))
    assert (root / "memory" / PARENT / "e1" / "memory.limit_in_bytes").read_text() == (
        f"{128 * 1024 * 1024}\n"
    )
    assert (root / "pids" / PARENT / "e1" / "pids.max").read_text() == "32\n"
    assert (root / "cpu" / PARENT / "e1" / "cpu.cfs_period_us").read_text() == "100000\n"
    assert (root / "cpu" / PARENT / "e1" / "cpu.cfs_quota_us").read_text() == "200000\n"
    assert (root / "freezer" / PARENT / "e1").is_dir()
    assert cg.join_files("e1") == [
        root / c / PARENT / "e1" / "cgroup.procs" for c in V1_CONTROLLERS
    ]
    assert cg.exists("e1")


def test_v1_cpuset_and_cpuacct_are_joined_where_mounted_on_fake_cgroupfs(
    tmp_path: Path,
) -> None:
    root = fake_v1_with_cpuset(tmp_path)
    cg = CgroupV1(PARENT, root)
    cg.prepare()
    # the parent gets the host's CPUs and memory nodes, without which nothing can join
    assert (root / "cpuset" / PARENT / "cpuset.cpus").read_text() == "0-3\n"
    assert (root / "cpuset" / PARENT / "cpuset.mems").read_text() == "0\n"

    def cpus() -> dict[str, str]:
        return {n: (root / "cpuset" / PARENT / n / "cpuset.cpus").read_text() for n in cg.names()}

    for name in ("e1", "e2", "e3", "e4"):
        cg.create(name, Limits())
    # Created on all of the parent's CPUs, so sandboxes starting together are spread by the
    # scheduler; each is placed once it is up.
    assert cpus() == dict.fromkeys(("e1", "e2", "e3", "e4"), "0-3\n")
    assert (root / "cpuset" / PARENT / "e1" / "cpuset.mems").read_text() == "0\n"
    for name, limit in (("e1", 1.0), ("e2", 2.0), ("e3", 0.5), ("e4", 1.0)):
        cg.place_cpus(name, limit)
    assert cpus() == {"e1": "0\n", "e2": "1-2\n", "e3": "3\n", "e4": "0\n"}
    assert cg.join_files("e1") == [
        root / c / PARENT / "e1" / "cgroup.procs" for c in (*V1_CONTROLLERS, "cpuset", "cpuacct")
    ]
    assert (root / "cpuacct" / PARENT / "e1").is_dir()


def test_v1_prepare_keeps_a_parent_cpuset_already_set_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v1_with_cpuset(tmp_path)
    (root / "cpuset" / PARENT / "cpuset.cpus").write_text("2-3\n")
    cg = CgroupV1(PARENT, root)
    cg.prepare()
    assert (root / "cpuset" / PARENT / "cpuset.cpus").read_text() == "2-3\n"
    cg.create("e1", Limits(cpus=8.0))
    cg.place_cpus("e1", 8.0)  # more than there are: all of the parent's
    assert (root / "cpuset" / PARENT / "e1" / "cpuset.cpus").read_text() == "2-3\n"


def test_v1_cpuacct_mounted_with_cpu_is_joined_once_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    (root / "cpuacct").symlink_to(root / "cpu")  # as hosts mounting cpu,cpuacct link them
    assert CgroupV1(PARENT, root).controllers == V1_CONTROLLERS


def test_v1_names_exists_and_pids_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    cg = CgroupV1(PARENT, root)
    assert cg.names() == set()
    (root / "memory" / PARENT / "a1").mkdir(parents=True)
    (root / "pids" / PARENT / "b2").mkdir(parents=True)
    (root / "pids" / PARENT / "b2" / "cgroup.procs").write_text("7\n8\n9\n")
    (root / "pids" / PARENT / "tasks").write_text("")
    assert cg.names() == {"a1", "b2"}
    assert cg.exists("a1")  # present in any one controller counts
    assert cg.pids("b2") == [7, 8, 9]
    assert cg.pids("a1") == []  # pids are read from the pids controller only
    assert not cg.exists("c3")


def test_v1_freeze_thaw_and_kill_all_on_fake_cgroupfs(tmp_path: Path) -> None:
    # The v1 freezer reports its state in the file that is written, so a plain file models it.
    root = fake_v1(tmp_path)
    cg = CgroupV1(PARENT, root)
    cg.create("e1", Limits())
    state = root / "freezer" / PARENT / "e1" / "freezer.state"
    cg.freeze("e1")
    assert state.read_text() == "FROZEN\n"
    cg.thaw("e1")
    assert state.read_text() == "THAWED\n"
    cg.kill_all("e1", timeout_s=1.0)  # no members: freeze, nothing to kill, thaw
    assert state.read_text() == "THAWED\n"
    cg.kill_all("missing", timeout_s=0.1)


def test_v1_remove_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    cg = CgroupV1(PARENT, root)
    for c in V1_CONTROLLERS[:2]:
        (root / c / PARENT / "e1").mkdir(parents=True)
    cg.remove("e1")  # controllers where it never existed are skipped
    assert not cg.exists("e1")
    cg.create("e2", Limits())
    with pytest.raises(SubstrateError):
        cg.remove("e2")  # fake: the limit files make the directories non-empty


def test_v1_oom_counters_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v1(tmp_path)
    cg = CgroupV1(PARENT, root)
    cg.create("e1", Limits(memory_mb=256))
    memory = root / "memory" / PARENT / "e1"
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (memory / "memory.failcnt").write_text("17\n")
    assert cg.oom_counters("e1") == OomCounters(3, 17, 256 * 1024 * 1024)
    # A kernel before 4.13 has no oom_kill line: no kills known.
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert cg.oom_counters("e1") == OomCounters(0, 17, 256 * 1024 * 1024)
    assert cg.oom_counters("gone") is None


def test_v2_oom_counters_on_fake_cgroupfs(tmp_path: Path) -> None:
    root = fake_v2(tmp_path)
    d = fake_v2_child(root, "e1")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n")
    (d / "memory.max").write_text("max\n")
    assert CgroupV2(PARENT, root).oom_counters("e1") == OomCounters(2, 9, 0)
    assert CgroupV2(PARENT, root).oom_counters("gone") is None


def test_write_to_a_missing_cgroup_is_a_substrate_error(tmp_path: Path) -> None:
    cg = CgroupV1(PARENT, fake_v1(tmp_path))
    with pytest.raises(SubstrateError, match="FROZEN"):
        cg.freeze("missing")


# -- waiting ----------------------------------------------------------------------------------


def test_wait_for_returns_once_the_predicate_holds() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    _wait_for(third_time, 1.0, "three calls")
    assert len(calls) == 3


def test_wait_for_times_out_with_a_substrate_error() -> None:
    with pytest.raises(SubstrateError, match="waiting for the impossible"):
        _wait_for(lambda: False, 0.05, "the impossible")
