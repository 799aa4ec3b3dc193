"""Languages other than Python: kernelspecs found by language, started as the context's
kernel, and the bookkeeping cells in each language.

The kernels here are ipykernels whose kernelspecs claim another language: what is tested is
the agent's side (discovery, mapping, launch from a spec, errors); the real JavaScript,
TypeScript, bash, R and Java kernels are tested in the code-interpreter-v1 image
(tests/integration/test_default_images.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coppice_agent.kernel_dialects import env_code
from coppice_agent.kernel_specs import (
    KernelCatalog,
    UnknownLanguage,
    canonical_language,
    resolve_language,
)
from tests.agent.envd_harness import sandbox_env
from tests.agent.test_interpreter import Served, serve

IPYKERNEL = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def write_spec(root: Path, name: str, language: str, **extra: Any) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    spec = {"argv": IPYKERNEL, "display_name": name, "language": language, **extra}
    (directory / "kernel.json").write_text(json.dumps(spec))
    return directory


# -- discovery (no kernels started) -----------------------------------------------------------


def test_aliases() -> None:
    assert canonical_language("JS") == "javascript"
    assert canonical_language(" ts ") == "typescript"
    assert canonical_language("sh") == "bash"
    assert canonical_language("python3") == "python"
    assert canonical_language("R") == "r"
    assert canonical_language("julia") == "julia"


def test_catalog_maps_kernelspecs_by_language(tmp_path: Path) -> None:
    system = tmp_path / "system"
    write_spec(system, "ir", "R")
    write_spec(system, "bash", "bash", env={"PS1": "$"})
    write_spec(system, "jslab", "javascript")
    write_spec(system, "javascript", "javascript")
    write_spec(system, "tslab", "typescript")
    write_spec(system, "python3", "python")
    write_spec(system, "java", "java", interrupt_mode="message")
    (system / "broken").mkdir()
    (system / "broken" / "kernel.json").write_text("{not json")
    kernels = KernelCatalog([str(system)]).kernels()
    assert {lang: k.name for lang, k in kernels.items()} == {
        "r": "ir",
        "bash": "bash",
        # Two JavaScript kernels: the one named after the language wins.
        "javascript": "javascript",
        "typescript": "tslab",
        "java": "java",
    }
    assert kernels["bash"].env == {"PS1": "$"}
    assert kernels["java"].interrupt_mode == "message"
    assert kernels["r"].resource_dir == str(system / "ir")
    assert kernels["r"].argv == tuple(IPYKERNEL)


def test_a_users_own_kernels_come_first(tmp_path: Path) -> None:
    write_spec(tmp_path / "system", "bash", "bash", display_name="system")
    home = tmp_path / "home"
    write_spec(home / ".local/share/jupyter/kernels", "bash", "bash", display_name="mine")
    catalog = KernelCatalog([str(tmp_path / "system")])
    assert catalog.kernels()["bash"].display_name == "system"
    assert catalog.kernels(str(home))["bash"].display_name == "mine"


def test_resolve_names_what_the_sandbox_has(tmp_path: Path) -> None:
    write_spec(tmp_path, "ir", "R")
    catalog = KernelCatalog([str(tmp_path)])
    assert resolve_language(catalog, None) == ("python", None)
    assert resolve_language(catalog, "Python") == ("python", None)
    language, spec = resolve_language(catalog, "r")
    assert language == "r" and spec is not None and spec.name == "ir"
    with pytest.raises(UnknownLanguage) as info:
        resolve_language(catalog, "js")
    assert str(info.value) == "language 'js' is not supported in this sandbox; available: python, r"


# -- the bookkeeping cells, run by the real interpreters where the host has them ---------------


def test_bash_env_code_sets_quotes_and_unsets() -> None:
    code = env_code("bash")
    assert code is not None
    cell = code({"A": "it's $HOME `x`", "not-a-name": "skipped"}, ["B"])
    done = subprocess.run(
        ["bash", "-c", f'{cell}\nprintf \'%s|%s\' "$A" "${{B-unset}}"'],
        env={"B": "was set", "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == "it's $HOME `x`|unset"
    assert code({}, []) == ":"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed on this host")
def test_javascript_env_code_runs_in_node() -> None:
    code = env_code("javascript")
    assert code is not None
    cell = code({"A": 'quote " and \\ and \u2028'}, ["B"])
    script = f"{cell}; process.stdout.write(JSON.stringify([process.env.A, process.env.B]))"
    done = subprocess.run(
        ["node", "-e", script],
        env={"B": "was set", "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == ['quote " and \\ and \u2028', None]


def test_r_and_typescript_env_code_and_java_has_none() -> None:
    r = env_code("r")
    assert r is not None
    assert r({"A": 'x"y'}, ["B"]) == (
        'invisible(do.call(Sys.setenv, as.list(setNames(c("x\\"y"), c("A")))))\n'
        'invisible(Sys.unsetenv(c("B")))'
    )
    ts = env_code("typescript")
    assert ts is not None and "Record<string, string>" in ts({"A": "1"}, [])
    assert env_code("java") is None


# -- contexts of other languages, over HTTP and through the SDK --------------------------------


@pytest.fixture(scope="module")
def served(home: Path) -> Iterator[Served]:
    # In the default user's own kernel directory: that is where the catalog looks first.
    kernels = home / ".local/share/jupyter/kernels"
    write_spec(kernels, "fakejs", "JavaScript", env={"FROM_SPEC": "yes"})
    write_spec(kernels, "fakejava", "java")
    with serve(sandbox_env(home)) as s:
        yield s


def test_a_context_by_language_alias(served: Served) -> None:
    sbx = served.sdk()
    ctx = sbx.create_code_context(language="js")
    assert ctx.language == "javascript"
    # The kernel started from the spec (with the spec's env), on its own.
    ex = sbx.run_code("import os; os.environ['FROM_SPEC']", context=ctx)
    assert ex.error is None and ex.text == "'yes'"
    assert sbx.run_code("'FROM_SPEC' in __import__('os').environ").text == "False"
    listed = {c.id: c.language for c in sbx.list_code_contexts()}
    assert listed[ctx.id] == "javascript"
    sbx.restart_code_context(ctx)
    assert sbx.run_code("os", context=ctx).error is not None  # a fresh kernel
    sbx.remove_code_context(ctx)


def test_run_code_by_language_uses_one_default_context_per_language(served: Served) -> None:
    sbx = served.sdk()
    assert sbx.run_code("z = 41", language="javascript").error is None
    assert sbx.run_code("z + 1", language="js").text == "42"
    assert sbx.run_code("'z' in dir()").text == "False"  # python's default is another kernel


def test_errors_name_the_languages_there_are(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        r = client.post("/execute", json={"code": "1", "language": "cobol"})
        assert r.status_code == 400
        message = r.json()["message"]
        assert message.startswith("language 'cobol' is not supported in this sandbox; available:")
        assert {"python", "javascript", "java"} <= set(message.rpartition(": ")[2].split(", "))
        r = client.post("/contexts", json={"language": "cobol"})
        assert r.status_code == 400
        # Java cannot change its environment: refused, not run without the variables.
        r = client.post("/execute", json={"code": "1", "language": "java", "env_vars": {"A": "1"}})
        assert r.status_code == 400
        assert r.json()["message"] == "env_vars are not supported for java code"
        ctx = client.post("/contexts", json={"language": "js"}).json()
        r = client.post(
            "/execute", json={"code": "1", "context_id": ctx["id"], "language": "python"}
        )
        assert r.status_code == 400
        assert r.json()["message"] == f"context {ctx['id']!r} runs javascript, not python"
        assert client.delete(f"/contexts/{ctx['id']}").status_code == 204
