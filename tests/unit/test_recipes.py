"""The built-in recipes as data: names, aliases, bases, and the files their COPY steps read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from coppice.errors import UnknownRecipe
from coppice.images.build_files import hash_context_files
from coppice.images.recipes import (
    BASE_PACKAGES,
    PYTHON_PACKAGES,
    RECIPE_FILES,
    RECIPES,
    recipe,
)
from coppice.images.spec import FromDebian, FromTemplate

CI = RECIPE_FILES / "code-interpreter"
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.MULTILINE)


def _names(text: str) -> set[str]:
    return {re.sub(r"[-_.]+", "-", m.group(1)).lower() for m in REQUIREMENT.finditer(text)}


def test_the_default_images_and_their_aliases() -> None:
    assert set(RECIPES) == {"python", "python-vm", "base", "code-interpreter-v1"}
    assert RECIPES["python"].aliases == ()
    assert RECIPES["base"].aliases == ("e2bdev/base",)
    assert set(RECIPES["code-interpreter-v1"].aliases) == {
        "code-interpreter",
        "e2bdev/code-interpreter",
    }
    every_name = [n for r in RECIPES.values() for n in (r.name, *r.aliases)]
    assert len(every_name) == len(set(every_name))
    assert all(r.description for r in RECIPES.values())
    assert RECIPES["python-vm"].cold_start is False
    with pytest.raises(UnknownRecipe):
        recipe("nope")


def test_bases() -> None:
    assert RECIPES["python"].base == FromDebian("bookworm", PYTHON_PACKAGES)
    assert RECIPES["python"].steps == ()
    base = RECIPES["base"].base
    assert isinstance(base, FromDebian) and base.packages == BASE_PACKAGES
    assert set(PYTHON_PACKAGES) <= set(BASE_PACKAGES)
    for tool in ("nodejs", "npm", "git", "curl", "wget", "jq", "build-essential", "sudo"):
        assert tool in BASE_PACKAGES
    assert len(BASE_PACKAGES) == len(set(BASE_PACKAGES))
    assert RECIPES["code-interpreter-v1"].base == FromTemplate("base")
    # Six kernels at once do not fit the default 512 MiB; E2B gives this template 1 GiB.
    limits = RECIPES["code-interpreter-v1"].limits
    assert limits is not None and limits.memory_mb == 1024


def test_build_steps_run_as_root_but_the_last_check() -> None:
    steps = RECIPES["code-interpreter-v1"].steps
    for step in (*RECIPES["base"].steps, *steps[:-1]):
        # RUN (command, user), COPY (src, dest, owner)
        assert step.args[1 if step.kind == "RUN" else 2] == "root", step.label()
    assert steps[-1].kind == "RUN" and len(steps[-1].args) == 1  # as `user`


def test_copy_steps_name_existing_files_by_their_hash() -> None:
    copies = [s for s in RECIPES["code-interpreter-v1"].steps if s.kind == "COPY"]
    assert copies
    for step in copies:
        src = step.args[0]
        assert list(RECIPE_FILES.glob(src)), f"{src} is not in {RECIPE_FILES}"
        assert step.files_hash == hash_context_files(RECIPE_FILES, src)


def test_the_python_lock_is_complete_hashed_and_leaves_debians_stack_alone() -> None:
    lock = (CI / "requirements.lock").read_text()
    wanted = _names((CI / "requirements.in").read_text())
    locked = _names(lock)
    assert wanted <= locked
    assert {"pandas", "matplotlib", "e2b-charts", "bash-kernel", "jjava"} <= locked
    # Every pinned package carries at least one hash, so pip's --require-hashes accepts it.
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 3)[-1]):
        if REQUIREMENT.match(block):
            assert "--hash=sha256:" in block, block.splitlines()[0]
    overridden = {
        re.sub(r"[-_.]+", "-", line.split(";")[0].strip()).lower()
        for line in (CI / "overrides.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"ipykernel", "ipython", "jupyter-client", "pyzmq", "tornado"} <= overridden
    assert not overridden & locked


def test_the_node_lock_has_integrity_and_no_registry_url() -> None:
    lock = json.loads((CI / "node-kernels/package-lock.json").read_text())
    packages = {k: v for k, v in lock["packages"].items() if k}
    assert "node_modules/ijavascript" in packages and "node_modules/tslab" in packages
    # The shallow layout keeps tslab's own @types/node beside it, where tslab looks.
    assert "node_modules/tslab/node_modules/@types/node" in packages
    for name, entry in packages.items():
        assert entry.get("integrity", "").startswith("sha"), name
        assert "resolved" not in entry, name


def test_kernelspecs_and_ipython_files_are_valid() -> None:
    spec = json.loads((CI / "kernels/javascript/kernel.json").read_text())
    assert spec["language"] == "javascript" and "{connection_file}" in spec["argv"]
    config = (CI / "ipython/ipython_kernel_config.py").read_text()
    startup = Path("/etc/ipython") / "coppice_results.py"
    assert str(startup) in config
    assert (CI / "ipython" / startup.name).is_file()
