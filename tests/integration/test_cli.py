"""The `coppice` command end to end: bad input, concurrency across processes, the smoke rig."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from coppice.lifecycle import State
from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord

from .conftest import run_cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (("pool", "warm", "nosuch", "--count", "1"), "template 'nosuch' is not built", 1),
        (("pool", "checkout", "nosuch"), "coppice template build nosuch", 1),
        (("pool", "warm", "python", "--count", "0"), "--count must be between 1 and 200", 2),
        (("pool", "warm", "python", "--count", "10000"), "--count must be between 1 and 200", 2),
        (("pool", "return", "ffffffffff"), "no pool entry 'ffffffffff'", 1),
        (("pool", "checkout", "python"), "warm more with `coppice pool warm python", 1),
        (("template", "build", "nosuch"), "no recipe named 'nosuch'", 1),
        (("pool", "drain", "nosuch"), "template 'nosuch' is not built", 1),
    ],
)
def test_bad_input_is_one_clear_line(
    pool: PoolController,
    template: TemplateRecord,
    cli_env: dict[str, str],
    args: tuple[str, ...],
    message: str,
    code: int,
) -> None:
    before = pool.list()
    done = run_cli(cli_env, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert message in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr  # one line, no traceback
    assert pool.list() == before


def test_missing_prerequisites_are_named(cli_env: dict[str, str], pool: PoolController) -> None:
    env = dict(cli_env, PATH="/nonexistent")
    done = run_cli(env, "pool", "warm", "python", "--count", "1")
    assert done.returncode == 3
    assert "is not installed; run scripts/setup" in done.stderr

    nobody = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            str(Path(__file__).parents[2] / ".venv/bin/coppice"),
            "pool",
            "list",
        ],
        env=cli_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert nobody.returncode == 3 and "need root" in nobody.stderr


def test_returning_twice_and_removing_a_busy_template(
    pool: PoolController, cli_env: dict[str, str]
) -> None:
    assert run_cli(cli_env, "pool", "warm", "python", "--count", "1").returncode == 0
    got = json.loads(run_cli(cli_env, "pool", "checkout", "python", "--json").stdout)
    assert {"id", "ip", "pid"} <= set(got)
    assert run_cli(cli_env, "pool", "return", got["id"]).returncode == 0
    again = run_cli(cli_env, "pool", "return", got["id"])
    assert again.returncode == 1 and "no pool entry" in again.stderr
    busy = run_cli(cli_env, "template", "rm", "python")
    assert busy.returncode == 1 and "coppice pool drain python" in busy.stderr


def test_two_warms_at_once(pool: PoolController, cli_env: dict[str, str]) -> None:
    exe = str(Path(__file__).parents[2] / ".venv/bin/coppice")
    procs = [
        subprocess.Popen(
            [exe, "pool", "warm", "python", "--count", "3"],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _out, errs = p.communicate(timeout=120)
        assert p.returncode == 0, errs
    entries = pool.list("python")
    assert len(entries) == 6
    assert len({e.ip for e in entries}) == 6
    assert all(e.state is State.AVAILABLE for e in entries)
    listed = json.loads(run_cli(cli_env, "pool", "list", "--json").stdout)
    assert sorted(e["id"] for e in listed) == sorted(e.id for e in entries)


def test_template_rebuild_is_cached(template: TemplateRecord, cli_env: dict[str, str]) -> None:
    done = run_cli(cli_env, "template", "build", "python")
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    listed = run_cli(cli_env, "template", "list", "--json")
    (python,) = (t for t in json.loads(listed.stdout) if t["name"] == "python")
    assert python["recipe_hash"] == template.recipe_hash


def test_sandboxes_outlive_the_command(pool: PoolController, cli_env: dict[str, str]) -> None:
    assert run_cli(cli_env, "pool", "warm", "python", "--count", "1").returncode == 0
    (entry,) = pool.list("python")
    pid = entry.pid
    assert pid is not None
    assert Path(f"/proc/{pid}").exists()
    assert os.getpgid(pid) != os.getpgid(0)


def test_smoke_rig(pool: PoolController, cli_env: dict[str, str]) -> None:
    done = run_cli(cli_env, "smoke", "--template", "python", "--count", "2", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ALL GATES PASSED" in done.stdout
    header = next(line for line in done.stdout.splitlines() if line.startswith("template"))
    assert header.split() == ["template", "pool_size", "warm_s", "checkout_ms", "py_result"]
    row = next(line for line in done.stdout.splitlines() if line.startswith("python "))
    assert row.split()[1] == "2" and row.split()[-1] == "2"
    assert pool.list("python") == []
