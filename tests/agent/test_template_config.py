"""Reading `/etc/coppice/template.json` (`template_config`): the template builder's file, or
the defaults when it is missing or malformed, and the sandbox defaults made from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from coppice_agent import template_config
from coppice_agent.server import environment_for
from coppice_agent.template_config import TemplateConfig

BUILT = {
    "user": "app",
    "workdir": "/srv/app",
    "envs": {"APP_HOME": "/srv/app"},
    "start_cmd": "python -m http.server 8000",
    "ready_cmd": '[ -n "$(ss -Htuln sport = :8000)" ]',
}


def write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "template.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_the_builders_file_is_read(tmp_path: Path) -> None:
    config = template_config.load(write(tmp_path, BUILT), environ={})
    assert config == TemplateConfig(
        user="app",
        workdir="/srv/app",
        envs={"APP_HOME": "/srv/app"},
        start_cmd="python -m http.server 8000",
        ready_cmd='[ -n "$(ss -Htuln sport = :8000)" ]',
        ready_timeout_s=template_config.DEFAULT_READY_TIMEOUT_S,
    )


def test_the_path_and_the_ready_timeout_can_be_pointed_elsewhere(tmp_path: Path) -> None:
    path = write(tmp_path, {**BUILT, "ready_timeout_s": 5})
    environ = {template_config.PATH_VARIABLE: str(path)}
    assert template_config.config_path(environ) == path
    assert template_config.config_path({}) == template_config.DEFAULT_PATH
    assert template_config.load(path, environ={}).ready_timeout_s == 5
    overridden = template_config.load(path, {template_config.READY_TIMEOUT_VARIABLE: "2.5"})
    assert overridden.ready_timeout_s == 2.5


def test_a_missing_file_is_todays_defaults(tmp_path: Path) -> None:
    config = template_config.load(tmp_path / "absent.json", environ={})
    assert config == TemplateConfig()
    assert (config.user, config.workdir, dict(config.envs)) == ("user", None, {})
    assert config.start_cmd is None and config.ready_cmd is None


def test_empty_commands_are_none(tmp_path: Path) -> None:
    config = template_config.load(write(tmp_path, {"start_cmd": "", "ready_cmd": " "}), {})
    assert config.start_cmd is None and config.ready_cmd is None


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("{not json", "malformed"),
        ([1, 2], "expected a JSON object"),
        ({**BUILT, "user": ""}, "'user'"),
        ({**BUILT, "workdir": "relative/dir"}, "'workdir'"),
        ({**BUILT, "envs": {"A": 1}}, "'envs'"),
        ({**BUILT, "start_cmd": ["python", "-m"]}, "'start_cmd'"),
        ({**BUILT, "ready_timeout_s": 0}, "'ready_timeout_s'"),
        ({**BUILT, "ready_timeout_s": True}, "'ready_timeout_s'"),
    ],
)
def test_a_malformed_file_is_logged_and_the_defaults_apply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: object, named: str
) -> None:
    path = write(tmp_path, content)
    with caplog.at_level(logging.ERROR, logger="coppice_agent.template_config"):
        config = template_config.load(path, environ={})
    assert config == TemplateConfig()
    assert str(path) in caplog.text and named in caplog.text
    assert "using the defaults" in caplog.text


def test_a_bad_timeout_override_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, BUILT)
    with caplog.at_level(logging.ERROR, logger="coppice_agent.template_config"):
        config = template_config.load(path, {template_config.READY_TIMEOUT_VARIABLE: "soon"})
    assert config.ready_timeout_s == template_config.DEFAULT_READY_TIMEOUT_S
    assert template_config.READY_TIMEOUT_VARIABLE in caplog.text


def test_the_sandbox_starts_from_the_templates_defaults() -> None:
    config = TemplateConfig.from_json(BUILT)
    env = environment_for(config, {})
    assert (env.default_user, env.default_workdir) == ("app", "/srv/app")
    assert env.template_envs == {"APP_HOME": "/srv/app"}
    assert env.env_vars == {}
    # An operator's COPPICE_DEFAULT_USER still names the user.
    assert environment_for(config, {"COPPICE_DEFAULT_USER": "root"}).default_user == "root"


def test_warm_kernel_is_on_unless_the_builder_turned_it_off() -> None:
    assert TemplateConfig.from_json({}).warm_kernel
    assert not TemplateConfig.from_json({"warm_kernel": False}).warm_kernel
    with pytest.raises(template_config.InvalidTemplateConfig, match="warm_kernel"):
        TemplateConfig.from_json({"warm_kernel": "no"})
