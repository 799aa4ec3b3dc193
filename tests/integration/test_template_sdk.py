"""The unmodified e2b SDK's `Template` builder against `coppice serve`: every step type the
SDK compiles to, a start command with each kind of ready check, a failing step reported
through the SDK, and sandboxes started from the result out of a warm pool."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import (
    BuildException,
    Sandbox,
    Template,
    wait_for_file,
    wait_for_port,
    wait_for_process,
    wait_for_timeout,
    wait_for_url,
)
from e2b.template.logger import LogEntry

from coppice.images.builder import TemplateBuilder
from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord

from .conftest import SDK_POOL
from .gateway_process import GatewayProcess, serving

pytestmark = pytest.mark.integration


BUILT = ("sdk-every-step", "sdk-ready-url", "sdk-ready-process", "sdk-ready-file",
         "sdk-ready-timeout", "sdk-failing")  # fmt: skip


@pytest.fixture(scope="module")
def builds_gateway(
    cli_env: dict[str, str],
    base_template: TemplateRecord,
    controller: PoolController,
    instance_dir: Path,
) -> Iterator[GatewayProcess]:
    """`coppice serve` with a warm `base` pool; templates built through the API get a warm
    entry of their own (`built_template_pool_target`)."""
    log = instance_dir / "gateway-builds.log"
    try:
        with serving(cli_env, log, {"base": SDK_POOL}, controller.drain) as gw:
            yield gw
    finally:
        # Templates built through the API keep a warm entry in every later gateway.
        for name in BUILT:
            controller.drain(name)
            if any(t.name == name for t in controller.store.list_templates()):
                TemplateBuilder(controller.settings, controller.store).remove(name)


@pytest.fixture()
def context(tmp_path: Path) -> Path:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("hello from the template\n")
    repo = tmp_path / "work"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README").write_text("cloned\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(tmp_path / "repo.git")],
                   check=True)  # fmt: skip
    return tmp_path


def test_every_step_type_builds_and_a_sandbox_starts_warm_from_it(
    builds_gateway: GatewayProcess, context: Path
) -> None:
    template = (
        Template(file_context_path=str(context))
        .from_template("base")
        .apt_install(["tree"], no_install_recommends=True)
        .pip_install(["six"])
        .npm_install(["is-number"], g=True)
        .copy("site", "/srv/site/")
        .copy("site/*.html", "pages")  # a wildcard: `pages` is a directory in the workdir
        .copy("repo.git", "/src/repo.git/")
        .git_clone("/src/repo.git", "/home/user/repo", branch="main", depth=1)
        .set_envs({"GREETING": "hi there"})
        .run_cmd("echo $GREETING > /tmp/greeting")
        .make_symlink("/srv/site/index.html", "/srv/site/latest.html", user="root")
        .set_workdir("/srv/site")
        .set_user("user")
        .set_start_cmd("python3 -m http.server 8123", wait_for_port(8123))
    )
    logs: list[LogEntry] = []
    info = Template.build(template, "sdk-every-step", cpu_count=1, memory_mb=512,
                          on_build_logs=logs.append)  # fmt: skip
    assert info.template_id
    assert any("pip install six" in e.message for e in logs), [e.message for e in logs][-20:]
    assert Template.exists("sdk-every-step")

    sbx = Sandbox.create("sdk-every-step", timeout=120)
    try:
        run = sbx.commands.run
        # Warm means the start command already serves when the sandbox is handed out.
        assert run("curl -s localhost:8123/latest.html").stdout == "hello from the template\n"
        assert run("pwd").stdout.strip() == "/srv/site"
        assert run("whoami").stdout.strip() == "user"
        assert run("echo $GREETING").stdout.strip() == "hi there"
        assert run("cat /tmp/greeting").stdout.strip() == "hi there"
        assert run("tree --version").exit_code == 0
        assert run("python3 -c 'import six; print(six.__name__)'").stdout.strip() == "six"
        assert run("ls /usr/local/lib/node_modules").stdout.split().count("is-number") == 1
        assert run("cat /home/user/repo/README").stdout == "cloned\n"
        assert run("cat /home/user/pages/index.html").stdout == "hello from the template\n"
        assert any("http.server" in " ".join([p.cmd, *p.args]) for p in sbx.commands.list())
    finally:
        sbx.kill()


@pytest.mark.parametrize(
    ("name", "start", "ready"),
    [
        ("sdk-ready-url", "python3 -m http.server 8124", wait_for_url("http://localhost:8124/")),
        ("sdk-ready-process", "sleep 1000", wait_for_process("sleep")),
        (
            "sdk-ready-file",
            "sleep 1 && touch /tmp/ready && sleep 1000",
            wait_for_file("/tmp/ready"),
        ),
        ("sdk-ready-timeout", "echo started > /tmp/started; sleep 1000", wait_for_timeout(1000)),
    ],
)
def test_each_ready_check_holds_the_entry_until_it_passes(
    builds_gateway: GatewayProcess, name: str, start: str, ready: object
) -> None:
    template = Template().from_template("base").set_start_cmd(start, ready)  # type: ignore[arg-type]
    Template.build(template, name)
    sbx = Sandbox.create(name, timeout=60)
    try:
        procs = " ".join(" ".join([p.cmd, *p.args]) for p in sbx.commands.list())
        assert start.split()[0] in procs
        if name == "sdk-ready-file":
            assert sbx.files.exists("/tmp/ready")
    finally:
        sbx.kill()


def test_a_failing_step_reaches_the_sdk_with_its_log_and_keeps_the_old_version(
    builds_gateway: GatewayProcess, controller: PoolController
) -> None:
    Template.build(Template().from_template("base").run_cmd("echo v1 > /tmp/v"), "sdk-failing")
    before = controller.store.get_template("sdk-failing")
    broken = Template().from_template("base").run_cmd("echo about to fail; exit 3")
    with pytest.raises(BuildException) as info:
        Template.build(broken, "sdk-failing")
    assert "exit status 3" in str(info.value)
    assert "about to fail" in str(info.value)
    assert controller.store.get_template("sdk-failing") == before
    sbx = Sandbox.create("sdk-failing", timeout=60)
    try:
        assert sbx.commands.run("cat /tmp/v").stdout == "v1\n"
    finally:
        sbx.kill()
