"""The build's pure parts: E2B's wire steps as a spec, the config they fold to, which steps
a build runs and which come from the cache."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coppice.errors import InvalidRequest, NotSupportedYet
from coppice.images.build_plan import plan_build
from coppice.images.spec import (
    FromImage,
    FromTemplate,
    ImageConfig,
    Step,
    fold_config,
    spec_from_e2b,
    step_key,
)


def test_an_sdk_body_becomes_a_spec() -> None:
    body = {
        "fromImage": "debian:bookworm",
        "force": False,
        "steps": [
            {"type": "RUN", "args": ["apt-get update", "root"], "force": False},
            {"type": "COPY", "args": ["a.txt", "/app/", "", ""], "filesHash": "ab" * 32},
            {"type": "ENV", "args": ["A", "1", "B", "2"], "force": False},
            {"type": "WORKDIR", "args": ["/app"], "force": False},
            {"type": "USER", "args": ["root"], "force": False},
        ],
        "startCmd": "python -m http.server 8000",
        "readyCmd": "sleep 1",
    }
    spec = spec_from_e2b("t", body)
    assert spec.base == FromImage("debian:bookworm")
    assert [s.kind for s in spec.steps] == ["RUN", "COPY", "ENV", "WORKDIR", "USER"]
    assert spec.steps[1].files_hash == "ab" * 32
    assert spec.start_cmd == "python -m http.server 8000"
    assert fold_config(spec.steps) == ImageConfig("root", "/app", (("A", "1"), ("B", "2")))


def test_no_base_means_e2bs_default_image_and_a_template_base_is_kept() -> None:
    assert spec_from_e2b("t", {"steps": []}).base == FromImage("e2bdev/base")
    assert spec_from_e2b("t", {"fromTemplate": "base"}).base == FromTemplate("base")


@pytest.mark.parametrize(
    "body, words",
    [
        ({"steps": [{"type": "HEALTHCHECK", "args": []}]}, "unknown step type"),
        ({"steps": [{"type": "COPY", "args": ["a", "/b"]}]}, "no filesHash"),
        ({"steps": [{"type": "ENV", "args": ["A"]}]}, "at least 2"),
        ({"steps": [{"type": "ENV", "args": ["A", "1", "B"]}]}, "pairs"),
        ({"steps": [{"type": "RUN", "args": [" "]}]}, "at least 1"),
        ({"fromImage": "a", "fromTemplate": "b"}, "not both"),
        ({"mystery": 1}, "unknown build field"),
        ({"substrate": "bhyve"}, "not one Coppice builds for"),
    ],
)
def test_bad_bodies_are_refused_with_what_is_wrong(body: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        spec_from_e2b("t", body)


def test_cloud_registries_are_refused_not_ignored() -> None:
    with pytest.raises(NotSupportedYet):
        spec_from_e2b("t", {"fromImage": "x", "fromImageRegistry": {"type": "aws"}})


def test_workdir_is_relative_to_the_last_one() -> None:
    config = fold_config([Step("WORKDIR", ("/srv",)), Step("WORKDIR", ("app",))])
    assert config.workdir == "/srv/app"
    assert config.user == "user"  # E2B's default, not Docker's root


RUN = Step("RUN", ("make",))
COPY = Step("COPY", ("a", "/a"), files_hash="h1")


def test_an_unchanged_build_is_all_cache_and_a_changed_last_step_runs_alone() -> None:
    steps = [RUN, COPY, Step("RUN", ("echo 1",))]
    first = plan_build("base", steps, lambda k: False)
    cached = {s.key for s in first.steps}
    again = plan_build("base", steps, cached.__contains__)
    assert again.to_run == ()
    changed = plan_build("base", [*steps[:2], Step("RUN", ("echo 2",))], cached.__contains__)
    assert [s.number for s in changed.to_run] == ["3"]


def test_new_files_change_the_key_of_their_step_and_every_later_one() -> None:
    a = plan_build("base", [COPY, RUN], lambda k: False)
    b = plan_build("base", [Step("COPY", ("a", "/a"), files_hash="h2"), RUN], lambda k: False)
    assert a.steps[0].key != b.steps[0].key and a.steps[1].key != b.steps[1].key


@given(st.lists(st.booleans(), min_size=1, max_size=8), st.integers(0, 7))
def test_nothing_after_a_forced_step_comes_from_the_cache(
    cached_flags: list[bool], forced_at: int
) -> None:
    steps = [Step("RUN", (f"echo {i}",), force=(i == forced_at)) for i in range(len(cached_flags))]
    keys, parent = [], "base"
    for s in steps:
        parent = step_key(parent, s)
        keys.append(parent)
    cached = {k for k, flag in zip(keys, cached_flags, strict=True) if flag}
    plan = plan_build("base", steps, cached.__contains__)
    seen_run = False
    for i, planned in enumerate(plan.steps):
        if seen_run or i >= forced_at:
            assert not planned.cached
        if not planned.cached:
            seen_run = True
        else:
            assert keys[i] in cached


def test_copy_paths_expand_the_images_variables_as_docker_does() -> None:
    from coppice.images.step_runner import expand_vars

    env = {"APP_HOME": "/app", "V": "2"}
    assert expand_vars("$APP_HOME/", env) == "/app/"
    assert expand_vars("${APP_HOME}/v$V/$UNSET", env) == "/app/v2/"


def test_a_vm_template_serves_from_its_pool_only() -> None:
    assert spec_from_e2b("t", {"substrate": "vm"}).cold_start is False
    assert spec_from_e2b("t", {}).cold_start is True
