"""The bracket around forks of user processes: the child is born with the user's
oom_score_adj, and the agent goes back to its own as soon as the last fork is done."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from coppice_agent.oom import OWN_SCORE, USER_OOM_SCORE_ADJ, UserForks


def test_a_child_forked_inside_is_born_with_the_users_score() -> None:
    before = OWN_SCORE.read_text()
    forks = UserForks()
    with forks.forking():
        # What it forks in turn inherits the value too: it is there before exec.
        child = subprocess.run(
            ["sh", "-c", "cat /proc/self/oom_score_adj; sh -c 'cat /proc/self/oom_score_adj'"],
            capture_output=True,
            text=True,
            check=True,
        )
    assert child.stdout.split() == [str(USER_OOM_SCORE_ADJ)] * 2
    assert OWN_SCORE.read_text() == before
    after = subprocess.run(
        ["cat", "/proc/self/oom_score_adj"], capture_output=True, text=True, check=True
    )
    assert after.stdout == before  # a process started outside keeps the agent's


def test_overlapping_forks_share_one_raise(tmp_path: Path) -> None:
    score = tmp_path / "oom_score_adj"
    score.write_text("-1000\n")
    forks = UserForks(score)
    with forks.forking():
        assert score.read_text() == "1000\n"
        with forks.forking():
            assert score.read_text() == "1000\n"
        assert score.read_text() == "1000\n"  # the first fork is still under way
    assert score.read_text() == "-1000\n"


def test_forks_on_threads_go_back_down_after_the_last(tmp_path: Path) -> None:
    score = tmp_path / "oom_score_adj"
    score.write_text("0\n")
    forks = UserForks(score)
    inside = threading.Barrier(4)
    seen: list[str] = []

    def fork() -> None:
        with forks.forking():
            inside.wait(timeout=5)
            seen.append(score.read_text())
            inside.wait(timeout=5)

    threads = [threading.Thread(target=fork) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert seen == ["1000\n"] * 4
    assert score.read_text() == "0\n"


def test_an_unusable_score_file_changes_nothing(tmp_path: Path) -> None:
    forks = UserForks(tmp_path / "missing" / "oom_score_adj")
    with forks.forking():
        pass  # children then get the agent's score; the start itself goes on
    assert not (tmp_path / "missing").exists()
