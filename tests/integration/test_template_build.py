"""Templates built from Dockerfiles through the CLI, on the real builder: steps in a build
sandbox, the per-step cache, failures that name their step and change nothing that serves,
and a local OCI archive as a base."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from coppice.images.builder import TemplateBuilder
from coppice.images.idshift import unshift_ownership
from coppice.images.layers import LayerStore
from coppice.images.oci import write_oci_archive
from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord

from .conftest import run_cli

pytestmark = pytest.mark.integration

DOCKERFILE = """\
FROM e2bdev/base
ARG GREETING=hello
ENV APP_HOME=/app
USER root
RUN mkdir -p $APP_HOME && echo "$GREETING from the build" > $APP_HOME/greeting
COPY app.py $APP_HOME/
ADD data/ /data/
WORKDIR /app
USER user
RUN echo "built as $(id -un) in $(pwd)" > /tmp/who
ENTRYPOINT ["python3", "-m", "http.server", "8000"]
"""


@pytest.fixture()
def context(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text("print('app')\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.csv").write_text("a,b\n1,2\n")
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    return tmp_path


@pytest.fixture()
def fresh_name(controller: PoolController) -> Iterator[str]:
    name = "from-dockerfile"
    yield name
    controller.drain(name)
    if any(t.name == name for t in controller.store.list_templates()):
        TemplateBuilder(controller.settings, controller.store).remove(name)


def _in_image(record: TemplateRecord, tmp_path: Path, path: str) -> str:
    """Read a file of a jail template's image through its layer stack."""
    layers = LayerStore(Path(record.rootfs.split(":")[0]).parents[1])
    ids = tuple(Path(p).name for p in reversed(record.rootfs.split(":")))
    with layers.mounted(ids, None, tmp_path / "view") as root:
        text = (root / path.lstrip("/")).read_text()
    (tmp_path / "view").rmdir()
    return text


def test_a_dockerfile_builds_runs_its_steps_and_rebuilds_from_cache(
    controller: PoolController,
    base_template: TemplateRecord,
    cli_env: dict[str, str],
    context: Path,
    fresh_name: str,
    tmp_path: Path,
) -> None:
    done = run_cli(cli_env, "template", "build", fresh_name, "-f", str(context / "Dockerfile"))
    assert done.returncode == 0, done.stderr
    record = controller.store.get_template(fresh_name)
    assert _in_image(record, tmp_path, "/app/greeting") == "hello from the build\n"
    assert _in_image(record, tmp_path, "/app/app.py") == "print('app')\n"
    assert _in_image(record, tmp_path, "/data/rows.csv") == "a,b\n1,2\n"
    assert _in_image(record, tmp_path, "/tmp/who") == "built as user in /app\n"
    config = json.loads(_in_image(record, tmp_path, "/etc/coppice/template.json"))
    assert config["user"] == "user" and config["workdir"] == "/app"
    assert config["envs"]["APP_HOME"] == "/app"
    assert config["start_cmd"] == "python3 -m http.server 8000"

    again = run_cli(cli_env, "template", "build", fresh_name, "-f", str(context / "Dockerfile"))
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    assert controller.store.get_template(fresh_name).recipe_hash == record.recipe_hash

    (context / "Dockerfile").write_text(DOCKERFILE.replace("/tmp/who", "/tmp/who2"))
    changed = run_cli(cli_env, "template", "build", fresh_name, "-f", str(context / "Dockerfile"))
    assert changed.returncode == 0, changed.stderr
    assert changed.stderr.count("CACHED") >= 5, changed.stderr
    assert _in_image(controller.store.get_template(fresh_name), tmp_path, "/tmp/who2")


@pytest.mark.parametrize(
    ("dockerfile", "words"),
    [
        ("FROM e2bdev/base\nRUN echo about to fail && false\n", "about to fail"),
        ("FROM e2bdev/base\nHEALTHCHECK CMD true\n", "line 2: HEALTHCHECK is not supported"),
        ("FROM e2bdev/base\nCOPY nowhere.txt /x\n", "nowhere.txt"),
        ("FROM e2bdev/base\nFROBNICATE x\n", "unknown instruction"),
        ("FROM e2bdev/base\nUSER nobody-here\nRUN true\n", "nobody-here"),
    ],
)
def test_a_bad_dockerfile_fails_with_its_step_and_keeps_the_old_version_serving(
    controller: PoolController,
    base_template: TemplateRecord,
    cli_env: dict[str, str],
    tmp_path: Path,
    fresh_name: str,
    dockerfile: str,
    words: str,
) -> None:
    good = tmp_path / "good.Dockerfile"
    good.write_text("FROM e2bdev/base\nRUN echo v1 > /tmp/version\n")
    assert run_cli(cli_env, "template", "build", fresh_name, "-f", str(good)).returncode == 0
    before = controller.store.get_template(fresh_name)

    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(dockerfile)
    done = run_cli(cli_env, "template", "build", fresh_name, "-f", str(bad))
    assert done.returncode != 0
    assert words in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert controller.store.get_template(fresh_name) == before


def test_a_local_oci_archive_is_a_base(
    controller: PoolController,
    template: TemplateRecord,
    cli_env: dict[str, str],
    tmp_path: Path,
    fresh_name: str,
) -> None:
    # An OCI image of the `python` template's own root, as a registry would serve it.
    layers = LayerStore(controller.settings.build_cache_dir)
    ids = tuple(Path(p).name for p in reversed(template.rootfs.split(":")))
    tree = tmp_path / "tree"
    with layers.mounted(ids, None, tmp_path / "view") as root:
        subprocess.run(["cp", "-a", f"{root}/.", str(tree)], check=True)
    unshift_ownership(tree, controller.settings.jail_uid_base)
    archive = tmp_path / "python.oci.tar"
    write_oci_archive(tree, archive)
    subprocess.run(["rm", "-rf", str(tree)], check=True)

    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        f"FROM oci-archive:{archive}\nUSER root\nRUN echo from-oci > /etc/marker\nUSER user\n"
    )
    done = run_cli(cli_env, "template", "build", fresh_name, "-f", str(dockerfile))
    assert done.returncode == 0, done.stderr

    controller.warm(fresh_name, 1)
    entry = controller.checkout(fresh_name)
    try:
        key = controller.settings.keys_dir / "pool_ed25519"
        ran = subprocess.run(
            ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
             "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"root@{entry.ip}",
             "cat /etc/marker"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ran.stdout == "from-oci\n", ran.stderr
    finally:
        controller.drain(fresh_name)
