"""E2B's result types from the code-interpreter image's IPython start-up, end to end: a
matplotlib figure arrives as `result.chart` (what `e2b_charts` makes of it) beside its PNG,
and a DataFrame as `result.data`.

The kernel is the host venv's ipykernel with the start-up file in its profile and matplotlib,
pandas and e2b-charts from the template's own hash-locked requirements, installed once into a
throwaway directory (a cache outside the project's environment); without a package index the
module is skipped.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coppice.images.recipes import RECIPE_FILES
from coppice_agent.kernel_output import result_event
from tests.agent.envd_harness import sandbox_env
from tests.agent.test_interpreter import Served, serve

CI = RECIPE_FILES / "code-interpreter"
#: what the chart and data formatters need, taken from the template's lock with its hashes
NEEDED = ("e2b-charts", "matplotlib", "numpy", "pandas", "pydantic", "pydantic-core",
          "annotated-types", "typing-inspection", "typing-extensions", "contourpy", "cycler",
          "fonttools", "kiwisolver", "packaging", "pillow", "pyparsing", "python-dateutil",
          "six", "pytz", "tzdata")  # fmt: skip


def _lock_subset() -> str:
    """The lock's entries for NEEDED, less what the host venv already has (the kernel runs
    on the venv, and the directory comes first on its path)."""
    blocks = re.split(r"\n(?=[A-Za-z0-9])", (CI / "requirements.lock").read_text())
    chosen = []
    for block in blocks:
        name = block.split("==", 1)[0].strip().lower()
        module = {"pillow": "PIL", "python-dateutil": "dateutil", "pydantic-core": "pydantic_core"}
        importable = module.get(name, name.replace("-", "_"))
        if name in NEEDED and importlib.util.find_spec(importable) is None:
            chosen.append(block.split("\n    # via")[0].rstrip(" \\\n"))
    return "\n".join(chosen) + "\n"


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coppice-tests"


@pytest.fixture(scope="module")
def chart_packages() -> Path:
    requirements = _lock_subset()
    target = _cache_root() / f"charts-{hashlib.sha256(requirements.encode()).hexdigest()[:16]}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    lock = target.parent / f"{target.name}.txt"
    lock.write_text(requirements)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--require-hashes",
            "--only-binary=:all:",
            "--target",
            str(work),
            "-r",
            str(lock),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        pytest.skip(f"cannot install matplotlib and e2b-charts here: {done.stderr[-300:]}")
    work.rename(target)
    return target


@pytest.fixture(scope="module")
def served(
    home: Path, chart_packages: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    ipython = tmp_path_factory.mktemp("ipython")
    startup = ipython / "profile_default" / "startup"
    startup.mkdir(parents=True)
    shutil.copy(CI / "ipython" / "coppice_results.py", startup / "coppice_results.py")
    env = sandbox_env(
        home,
        env_vars={
            "PYTHONPATH": str(chart_packages),
            "IPYTHONDIR": str(ipython),
            # No font cache under a throwaway home to rebuild in the middle of a test.
            "MPLCONFIGDIR": str(chart_packages.parent / "mplconfig"),
        },
    )
    with serve(env) as s:
        yield s


@pytest.fixture(scope="module")
def sbx(served: Served) -> Any:
    return served.sdk()


def test_e2b_types_become_the_results_data_and_chart() -> None:
    chart: dict[str, object] = {"type": "line", "title": None, "elements": []}
    bundle = {"text/plain": "<Figure>", "e2b/chart": chart, "e2b/data": {"a": [1]}, "x/y": "z"}
    assert result_event(bundle, is_main_result=False) == {
        "type": "result",
        "text": "<Figure>",
        "chart": chart,
        "data": {"a": [1]},
        "extra": {"x/y": "z"},
        "is_main_result": False,
    }


BAR = """
import json
import matplotlib.pyplot as plt
from e2b_charts import chart_figure_to_dict
fig = plt.figure()
plt.bar(["A", "B", "C"], [1, 2, 3], label="Books")
plt.title("Sales")
plt.xlabel("Author")
plt.ylabel("Sold [units]")
print(json.dumps(chart_figure_to_dict(fig)))
plt.show()
"""


def test_a_shown_figure_carries_its_chart_and_its_png(sbx: Any) -> None:
    ex = sbx.run_code(BAR)
    assert ex.error is None, ex.error
    [result] = ex.results
    assert base64.b64decode(result.png or "")[:4] == b"\x89PNG"
    assert result.chart is not None
    # Exactly what e2b_charts makes of the figure, as the SDK's BarChart.
    assert result.chart.to_dict() == json.loads("".join(ex.logs.stdout))
    assert type(result.chart).__name__ == "BarChart"
    assert (result.chart.type.value, result.chart.title) == ("bar", "Sales")
    assert (result.chart.y_label, result.chart.y_unit) == ("Sold [units]", "units")
    assert [(e.label, e.value) for e in result.chart.elements] == [("A", 1), ("B", 2), ("C", 3)]
    assert "chart" in result.formats() and "png" in result.formats()


def test_a_figure_value_and_a_line_chart(sbx: Any) -> None:
    ex = sbx.run_code(
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\n"
        "ax.plot([1, 2, 3], [2, 4, 8], label='growth')\nplt.close(fig)\nfig"
    )
    assert ex.error is None, ex.error
    [result] = ex.results
    assert result.is_main_result
    assert result.chart is not None and result.chart.type.value == "line"
    assert result.chart.elements[0].label == "growth"
    assert [tuple(p) for p in result.chart.elements[0].points] == [(1, 2), (2, 4), (3, 8)]


def test_an_empty_figure_has_no_chart(sbx: Any) -> None:
    ex = sbx.run_code("import matplotlib.pyplot as plt\nplt.figure()\nplt.show()")
    assert ex.error is None, ex.error
    [result] = ex.results
    assert result.chart is None and "0 Axes" in (result.text or "")


def test_a_dataframe_carries_its_columns(sbx: Any) -> None:
    ex = sbx.run_code(
        "import pandas as pd\n"
        "pd.DataFrame({'a': [1, 2], 'b': [0.5, float('nan')], "
        "'t': pd.to_datetime(['2024-01-01', '2024-01-02'])})"
    )
    assert ex.error is None, ex.error
    [result] = ex.results
    assert result.data == {
        "a": [1, 2],
        "b": [0.5, None],  # NaN is not JSON
        "t": ["2024-01-01T00:00:00", "2024-01-02T00:00:00"],
    }
    assert result.html and result.text


def test_nothing_is_imported_for_other_values(sbx: Any) -> None:
    ctx = sbx.create_code_context()
    try:
        ex = sbx.run_code("1 + 1", context=ctx)
        assert ex.text == "2" and ex.results[0].formats() == ["text"]
        check = "import sys; [m for m in ('pandas', 'matplotlib') if m in sys.modules]"
        assert sbx.run_code(check, context=ctx).text == "[]"
    finally:
        sbx.remove_code_context(ctx)
