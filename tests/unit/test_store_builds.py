"""Template builds, their logs and tags in the store: each decision one transaction."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from coppice.config import Limits
from coppice.errors import Conflict
from coppice.host.processes import ProcessIdentity
from coppice.store.records import BuildFailure, BuildLogEntry, TemplatePolicy, TemplateRecord
from coppice.store.store import Store


def _template(store: Store, name: str = "t") -> None:
    store.put_template(
        TemplateRecord(name, "fake", "ab" * 32, "/r", time.time(), 1.0, 0, TemplatePolicy())
    )


def test_a_build_goes_from_waiting_to_ready_and_takes_its_tags(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    limits = Limits(memory_mb=1024, cpus=2.0)
    build = store.add_build("t", limits, ["v1", "default"])
    assert (build.status, build.limits, build.tags, build.triggered) == (
        "waiting", limits, ("v1", "default"), False
    )  # fmt: skip
    assert store.trigger_build(build.id).triggered
    with pytest.raises(Conflict):
        store.trigger_build(build.id)
    assert store.finish_build(build.id, "h") is False  # not building yet
    assert store.begin_build(build.id) and not store.begin_build(build.id)
    assert store.list_tags("t") == []  # a build's tags are its own only once it succeeded
    assert store.finish_build(build.id, "h")
    done = store.get_build(build.id)
    assert done is not None and (done.status, done.recipe_hash) == ("ready", "h")
    assert done.finished_at is not None
    assert {t.tag: t.build_id for t in store.list_tags("t")} == {"v1": build.id,
                                                                 "default": build.id}  # fmt: skip

    later = store.add_build("t", limits, ["default"])
    store.trigger_build(later.id)
    store.begin_build(later.id)
    store.finish_build(later.id, "h2")
    tags = {t.tag: t.build_id for t in store.list_tags("t")}
    assert tags == {"v1": build.id, "default": later.id}  # the tag moved, the other stayed
    assert [b.id for b in store.list_builds("t")] == [later.id, build.id]


def test_a_failed_build_keeps_its_reason_and_tags_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    build = store.add_build("t", Limits(), ["default"])
    store.trigger_build(build.id)
    store.begin_build(build.id)
    tail = (BuildLogEntry(1.0, "error", "boom", "2"),)
    assert store.fail_build(build.id, BuildFailure("step 2 failed", "2", tail))
    failed = store.get_build(build.id)
    assert failed is not None and failed.status == "error"
    assert failed.failure == BuildFailure("step 2 failed", "2", tail)
    assert not store.fail_build(build.id, BuildFailure("again"))  # it is over already
    assert store.list_tags("t") == []


def test_logs_page_by_offset_and_filter_by_level_and_time(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    build = store.add_build("t", Limits(), ["default"])
    levels = ["debug", "info", "warn", "error"] * 3
    store.add_build_logs(
        build.id, [BuildLogEntry(float(i), lv, f"line {i}", str(i)) for i, lv in enumerate(levels)]
    )
    store.add_build_logs(build.id, [BuildLogEntry(12.0, "info", "line 12")])
    page = store.build_logs(build.id, offset=10, limit=2)
    assert [e.message for e in page] == ["line 10", "line 11"]
    assert store.build_logs(build.id, offset=13) == []
    serious = store.build_logs(build.id, levels=("warn", "error"), offset=1, limit=3)
    assert [e.message for e in serious] == ["line 3", "line 6", "line 7"]
    assert [e.message for e in store.build_logs(build.id, since=11.0)] == ["line 11", "line 12"]
    newest = store.build_logs(build.id, until=5.0, newest_first=True, limit=2)
    assert [e.message for e in newest] == ["line 5", "line 4"]
    assert page[0] == BuildLogEntry(10.0, "warn", "line 10", "10")


def test_untag_removes_all_or_none_and_delete_takes_the_history(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    _template(store)
    build = store.add_build("t", Limits(), ["default"])
    store.add_build_logs(build.id, [BuildLogEntry(1.0, "info", "x")])
    store.tag_build("t", build.id, ["a", "b"])
    assert store.untag("t", ["a", "nope"]) == ["nope"]
    assert {t.tag for t in store.list_tags("t")} == {"a", "b"}
    assert store.untag("t", ["a"]) == []
    assert store.get_tag("t", "a") is None and store.get_tag("t", "b") is not None
    store.delete_template("t")
    assert store.list_builds("t") == [] and store.list_tags("t") == []
    assert store.build_logs(build.id) == []


def test_interrupt_ends_started_builds_of_processes_gone_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", owner=ProcessIdentity(os.getpid(), 0))  # a process gone
    asked, queued, running, done = (store.add_build("t", Limits(), []) for _ in range(4))
    for b in (queued, running, done):
        store.trigger_build(b.id)
    for b in (running, done):
        store.begin_build(b.id)
    store.finish_build(done.id, "h")
    assert sorted(store.interrupt_builds("restarted")) == sorted([queued.id, running.id])
    status = {b.id: b.status for b in store.list_builds("t")}
    assert status == {asked.id: "waiting", queued.id: "error", running.id: "error",
                      done.id: "ready"}  # fmt: skip

    live = Store(tmp_path / "db")  # this very process: its builds are not over
    mine = live.add_build("t", Limits(), [])
    live.trigger_build(mine.id)
    assert live.interrupt_builds("restarted") == []
