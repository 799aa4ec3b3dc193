"""E2B's default images as its users know them, through `coppice serve` and the unmodified
SDKs: `base` (what `Sandbox.create()` asks for) and `code-interpreter-v1` (what the code
interpreter's `Sandbox.create()` asks for).

Both are built once per test session (conftest's `base_template` and
`code_interpreter_template`); where they cannot be built here the module is skipped, saying
why.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import CommandExitException, Sandbox, Template
from e2b.api.client.api.templates import get_templates_template_id
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig
from e2b_code_interpreter import Sandbox as CodeSandbox

from coppice.errors import CoppiceError
from coppice.pool.controller import PoolController

from .gateway_process import GatewayProcess, sdk_pointed_at

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = ("base", "code-interpreter-v1")


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest) -> None:
    try:
        request.getfixturevalue("code_interpreter_template")  # builds `base` first
    except CoppiceError as exc:
        pytest.skip(f"cannot build the base and code-interpreter-v1 templates here: {exc}")


@pytest.fixture(scope="module")
def gateway(
    images: None, cli_env: dict[str, str], controller: PoolController, instance_dir: Path
) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        cli_env,
        instance_dir / "gateway-default-images.log",
        COPPICE_POOL_TARGETS=",".join(f"{name}=1" for name in IMAGES),
    ).start()
    try:
        with sdk_pointed_at(gw):
            yield gw
    finally:
        for name in IMAGES:
            controller.drain(name)


@pytest.fixture(scope="module")
def base(gateway: GatewayProcess) -> Iterator[Sandbox]:
    sbx = Sandbox.create(timeout=600)  # the SDK's default template: `base`
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.fixture(scope="module")
def ci(gateway: GatewayProcess) -> Iterator[CodeSandbox]:
    sbx = CodeSandbox.create(timeout=600)  # the SDK's default template: code-interpreter-v1
    try:
        yield sbx
    finally:
        sbx.kill()


# -- base -------------------------------------------------------------------------------------


def test_e2b_names_find_the_images(gateway: GatewayProcess) -> None:
    for name in ("base", "e2bdev/base", "code-interpreter-v1", "code-interpreter",
                 "e2bdev/code-interpreter"):  # fmt: skip
        assert Template.exists(name) is True, name
    client = get_api_client(ConnectionConfig())
    detail = get_templates_template_id.sync_detailed("code-interpreter", client=client)
    assert detail.status_code == 200 and detail.parsed is not None
    assert detail.parsed.template_id == "code-interpreter-v1"  # type: ignore[union-attr]


def test_base_has_the_tools_agents_reach_for(base: Sandbox) -> None:
    def out(cmd: str) -> str:
        return base.commands.run(cmd).stdout.strip()

    assert out("node -v").startswith("v")
    assert out("npm -v")
    assert out("git --version").startswith("git version")
    assert out("python --version").startswith("Python 3.11")
    assert out("pip --version").startswith("pip ")
    for tool in ("curl --version", "wget --version", "jq --version", "gcc --version",
                 "make --version", "unzip -v", "less --version", "ps -p 1", "ip -V"):  # fmt: skip
        assert base.commands.run(tool).exit_code == 0, tool
    assert out("whoami") == "user"
    assert base.commands.run("sudo -n true").exit_code == 0
    assert out("sudo -n whoami") == "root"


def test_pip_install_is_not_refused_as_externally_managed(base: Sandbox) -> None:
    # Sandboxes have no egress, so nothing can be fetched: what matters is that pip gets as
    # far as looking (Debian's PEP 668 marker would stop it before).
    with pytest.raises(CommandExitException) as info:
        base.commands.run("pip install --no-index coppice-no-such-package")
    assert "externally-managed-environment" not in info.value.stderr
    assert "No matching distribution" in info.value.stderr
    assert "break-system-packages" in base.commands.run("pip config list").stdout


# -- code-interpreter-v1 ----------------------------------------------------------------------


def test_a_dataframe_round_trip(ci: CodeSandbox) -> None:
    ci.files.write("/home/user/in.csv", "city,t\nOslo,3.5\nRome,17.25\nOslo,4.5\n")
    ex = ci.run_code(
        "import pandas as pd\n"
        "df = pd.read_csv('in.csv').groupby('city', as_index=False).mean()\n"
        "df.to_csv('out.csv', index=False)\n"
        "df"
    )
    assert ex.error is None, ex.error
    [result] = ex.results
    assert result.data == {"city": ["Oslo", "Rome"], "t": [4.0, 17.25]}
    assert "<table" in (result.html or "")
    assert ci.files.read("/home/user/out.csv") == "city,t\nOslo,4.0\nRome,17.25\n"


def test_a_matplotlib_chart(ci: CodeSandbox) -> None:
    ex = ci.run_code(
        "import json\nimport matplotlib.pyplot as plt\n"
        "from e2b_charts import chart_figure_to_dict\n"
        "fig = plt.figure()\n"
        "plt.bar(['A', 'B'], [3, 5])\nplt.title('Votes')\n"
        "print(json.dumps(chart_figure_to_dict(fig)))\n"
        "plt.show()"
    )
    assert ex.error is None, ex.error
    [result] = ex.results
    assert result.chart is not None
    assert result.chart.to_dict() == json.loads("".join(ex.logs.stdout))
    assert (result.chart.type.value, result.chart.title) == ("bar", "Votes")
    assert base64.b64decode(result.png or "")[:4] == b"\x89PNG"


def test_a_png_result(ci: CodeSandbox) -> None:
    ex = ci.run_code(
        "from PIL import Image\nfrom IPython.display import display\n"
        "display(Image.new('RGB', (4, 4), 'red'))"
    )
    assert ex.error is None, ex.error
    assert base64.b64decode(ex.results[0].png or "")[:4] == b"\x89PNG"


def test_every_kernel_language(ci: CodeSandbox) -> None:
    js = ci.run_code("const a = 20; a + 1", language="javascript")
    assert js.error is None and js.text == "21"
    assert ci.run_code("a * 2", language="js").text == "40"  # the same default context
    ts = ci.run_code("const n: number = 6; console.log(n * 7)", language="typescript")
    assert ts.error is None and ts.logs.stdout == ["42\n"]
    sh = ci.run_code("echo $((6 * 7)) $FOO; whoami", language="bash", envs={"FOO": "bar"})
    assert sh.error is None and "".join(sh.logs.stdout) == "42 bar\nuser\n"
    r = ci.run_code("x <- c(1, 2, 3)\nsum(x)", language="r")
    # IRkernel shows a value as display data, not as the cell's result.
    assert r.error is None and [res.text for res in r.results] == ["[1] 6"]
    java = ci.run_code("int x = 21;\nx * 2", language="java")
    assert java.error is None and java.text == "42"
    ctx = ci.create_code_context(language="ts")
    assert ctx.language == "typescript"
    ci.remove_code_context(ctx)
