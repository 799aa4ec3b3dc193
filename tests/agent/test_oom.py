"""The wrapper that starts user processes as the OOM killer's candidates, both ways: with
util-linux's choom, and with /bin/sh where an image has no choom."""

from __future__ import annotations

import os
import subprocess

import pytest

from coppice_agent.oom import CHOOM, USER_OOM_SCORE_ADJ, oom_candidate_argv


@pytest.mark.parametrize("have_choom", [True, False])
def test_the_command_runs_with_the_users_value(have_choom: bool) -> None:
    if have_choom and not os.access(CHOOM, os.X_OK):
        pytest.skip("no choom on this host")
    argv = oom_candidate_argv(
        ["sh", "-c", 'cat /proc/self/oom_score_adj; echo "$0|$1|$#"', "a b", "c"],
        have_choom=have_choom,
    )
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    # Arguments pass through untouched: spaces, count and all.
    assert done.stdout.splitlines() == [str(USER_OOM_SCORE_ADJ), "a b|c|1"]


@pytest.mark.parametrize("have_choom", [True, False])
def test_the_command_is_found_by_the_given_path(have_choom: bool) -> None:
    if have_choom and not os.access(CHOOM, os.X_OK):
        pytest.skip("no choom on this host")
    done = subprocess.run(
        oom_candidate_argv(["printenv", "MARK"], have_choom=have_choom),
        env={"PATH": "/usr/bin:/bin", "MARK": "seen"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == "seen\n"


def test_the_wrapper_is_choom_when_the_image_has_it() -> None:
    assert oom_candidate_argv(["true"], have_choom=True) == [CHOOM, "-n", "1000", "--", "true"]
    assert oom_candidate_argv(["true"], have_choom=False)[:2] == ["/bin/sh", "-c"]
