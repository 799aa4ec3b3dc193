"""Coppice's built-in templates, as `TemplateSpec`s: what goes into each image.

* `python` (and `python-vm`): the smallest and fastest image, commands plus a Python kernel.
* `base` (alias `e2bdev/base`): what an agent expects of E2B's default sandbox: Python with
  pip, Node.js with npm, git, curl, a compiler, sudo.
* `code-interpreter-v1` (aliases `code-interpreter`, `e2bdev/code-interpreter`): `base` plus
  E2B's data-science packages, kernels for JavaScript, TypeScript, bash, R and Java, and the
  IPython start-up that turns matplotlib figures into `result.chart`.

Everything a base can get from Debian goes into its debootstrap package list: that root is
made once and cached as one piece, far faster than the same packages through apt in a step.
COPY steps read `RECIPE_FILES` (package data beside this module); their `files_hash` is the
content of what they copy, so editing one of those files rebuilds from that step on.
"""

from __future__ import annotations

from pathlib import Path

from coppice.config import Limits
from coppice.errors import UnknownRecipe
from coppice.images.build_files import hash_context_files
from coppice.images.spec import FromDebian, FromTemplate, Step, TemplateSpec

#: the build context of the built-in recipes' COPY steps
RECIPE_FILES = Path(__file__).with_name("recipe_files")

# debootstrap does not resolve virtual packages, so the two providers that python3-zmq and
# ipykernel pull in through virtual names are listed explicitly; without them those packages
# are left unconfigured.
PYTHON_PACKAGES = (
    "python3",
    # `python` as well as `python3`, as E2B's images have (and agents type).
    "python-is-python3",
    "python3-ipykernel",
    "python3-cffi-backend",
    "libboost-regex1.74.0",
    "openssh-server",
    "iproute2",
    "procps",
)

# The same for Debian's npm, whose dependencies name a dozen node-* packages only by a
# virtual name; these are their only providers (and what those in turn need by a virtual
# name). apt would pick exactly these; debootstrap has to be told.
_NPM_VIRTUAL_PROVIDERS = (
    "node-cli-table",
    "node-css-selector-tokenizer",
    "node-string-width",
    "node-https-proxy-agent",
    "node-read-package-json",
    "node-css-loader",
    "node-slice-ansi",
    "node-function-bind",
    "node-fancy-log",
    "node-postcss",
    "node-jest-debbundle",
    "eslint",
    "node-ampproject-remapping",
    "node-deep-equal",
    "node-es-abstract",
    "node-resolve",
    "node-tape",
    "node-anymatch",
    "node-npm-run-path",
    "node-read-pkg",
    "node-browserslist",
    "node-n3",
    "node-resolve-from",
    "node-eslint-visitor-keys",
    "node-json-schema",
    "node-babel7",
    "node-babel7-runtime",
    "node-lodash-packages",
)

BASE_PACKAGES = (
    *PYTHON_PACKAGES,
    "python3-pip",
    "python3-venv",
    # python3-pip's setuptools needs it by its versioned virtual name
    "python3-distutils",
    "nodejs",
    "npm",
    *_NPM_VIRTUAL_PROVIDERS,
    "git",
    "openssh-client",
    "curl",
    "wget",
    "ca-certificates",
    "jq",
    "build-essential",
    "sudo",
    "less",
    "unzip",
    "zip",
    "xz-utils",
    "file",
    "tzdata",
)

#: how a build step runs as root: (command, user)
_ROOT = "root"

# Debian marks its Python "externally managed" (PEP 668), so a plain `pip install x` fails
# with a hint about venvs. E2B's images let it install, and agents expect that: as root into
# /usr/local, as `user` into ~/.local. Only this setting: the index pip uses at build time is
# the builder's business and stays out of the image.
_PIP_CONF = "[global]\\nbreak-system-packages = true\\n"

BASE_STEPS = (
    Step("RUN", (f"printf '{_PIP_CONF}' > /etc/pip.conf", _ROOT)),
    # `git init` otherwise prints a screenful of hints about the default branch name.
    Step("RUN", ("git config --system init.defaultBranch main", _ROOT)),
)


def _copy(src: str, dest: str) -> Step:
    """A COPY from RECIPE_FILES, owned by root: template files are not the user's to edit."""
    return Step("COPY", (src, dest, _ROOT), files_hash=hash_context_files(RECIPE_FILES, src))


_CI = "code-interpreter"
_CI_SHARE = "/usr/local/share/coppice/code-interpreter"
_NODE_KERNELS = "/usr/local/lib/node-kernels"
_APT_INSTALL = (
    "apt-get update -q"
    " && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {packages}"
    " && apt-get clean && rm -rf /var/lib/apt/lists/*"
)
#: what code-interpreter-v1's cells can `import` without installing anything first
CODE_INTERPRETER_IMPORTS = (
    "pandas", "numpy", "matplotlib.pyplot", "seaborn", "plotly", "scipy", "sklearn", "sympy",
    "openpyxl", "docx", "PIL", "requests", "bs4", "e2b_charts", "bash_kernel",
)  # fmt: skip

# Ordered from what changes least to what changes most, so an edited lock file rebuilds only
# the steps after it. Every kernel registers its kernelspec under /usr/local/share/jupyter (or
# Debian's under /usr/share/jupyter), where the agent and every user find it.
CODE_INTERPRETER_STEPS = (
    # R with IRkernel (Debian registers the `ir` kernelspec); a JDK for the Java kernel.
    Step(
        "RUN",
        (
            _APT_INSTALL.format(packages="r-base-core r-cran-irkernel openjdk-17-jdk-headless"),
            _ROOT,
        ),
    ),
    # JavaScript: ijavascript, the kernel E2B's image runs too (a cell's value is its result);
    # TypeScript: tslab, the TypeScript kernel the npm registry has. Both from a lock file
    # with integrity hashes; `shallow` lays packages out as `npm install -g` would, which
    # tslab needs to find its own @types/node.
    _copy(f"{_CI}/node-kernels", _NODE_KERNELS),
    Step(
        "RUN",
        (
            f"cd {_NODE_KERNELS}"
            " && npm ci --omit=dev --install-strategy=shallow --no-audit --no-fund"
            f" && ln -sf {_NODE_KERNELS}/node_modules/.bin/tslab /usr/local/bin/tslab"
            " && tslab install --binary /usr/local/bin/tslab --prefix /usr/local"
            # tslab also registers a JavaScript kernel; ijavascript is that one here.
            " && rm -rf /usr/local/share/jupyter/kernels/jslab /root/.npm",
            _ROOT,
        ),
    ),
    # ijavascript's own installer needs the `jupyter` command; its kernelspec is one file.
    _copy(f"{_CI}/kernels", "/usr/local/share/jupyter/kernels"),
    # The Python packages (and the bash and Java kernels) into /usr/local, beside Debian's
    # ipykernel that the kernel runs on. --no-deps: the lock is complete, and whatever it
    # leaves out (the Jupyter stack, see overrides.txt) is Debian's to provide.
    _copy(f"{_CI}/requirements.lock", f"{_CI_SHARE}/requirements.lock"),
    Step(
        "RUN",
        (
            "pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore"
            " --require-hashes --no-deps --only-binary=:all:"
            f" -r {_CI_SHARE}/requirements.lock"
            " && python3 -m bash_kernel.install --prefix /usr/local",
            _ROOT,
        ),
    ),
    # E2B's result types (e2b/data, e2b/chart) for every kernel of every user.
    _copy(f"{_CI}/ipython/*.py", "/etc/ipython/"),
    # As the user: checks that every package imports, and builds matplotlib's font cache now
    # rather than in the first cell that plots (seconds).
    Step("RUN", ("python3 -c 'import " + ", ".join(CODE_INTERPRETER_IMPORTS) + "'",)),
)

_PYTHON_DESCRIPTION = "Debian bookworm with Python 3, ipykernel and sshd"

RECIPES: dict[str, TemplateSpec] = {
    "python": TemplateSpec(
        name="python",
        base=FromDebian("bookworm", PYTHON_PACKAGES),
        substrate="jail",
        description=f"{_PYTHON_DESCRIPTION}, as a jail: the smallest and fastest image",
    ),
    "python-vm": TemplateSpec(
        name="python-vm",
        base=FromDebian("bookworm", PYTHON_PACKAGES),
        substrate="vm",
        description=f"{_PYTHON_DESCRIPTION}, as a QEMU microVM",
        # Booting under TCG takes seconds: serve only from the warm pool.
        cold_start=False,
    ),
    "base": TemplateSpec(
        name="base",
        base=FromDebian("bookworm", BASE_PACKAGES),
        steps=BASE_STEPS,
        substrate="jail",
        # What the e2b SDK's Sandbox.create() asks for.
        aliases=("e2bdev/base",),
        # E2B's base has no run_code: its entries warm without a kernel, and the first
        # run_code (through e2b_code_interpreter, which can name any template) starts one.
        warm_kernel=False,
        description=(
            "Debian bookworm with Python 3 and pip, Node.js and npm, git, curl, jq, "
            "build-essential and sudo, as a jail (E2B's base)"
        ),
    ),
    "code-interpreter-v1": TemplateSpec(
        name="code-interpreter-v1",
        base=FromTemplate("base"),
        steps=CODE_INTERPRETER_STEPS,
        substrate="jail",
        # E2B's own size for this template: a Python kernel with pandas and matplotlib plus
        # the TypeScript compiler alone fill the default 512 MiB, and the next kernel (Java's
        # two JVMs) is killed for memory.
        limits=Limits(memory_mb=1024),
        # What e2b_code_interpreter's Sandbox.create() asks for is the name itself.
        aliases=("code-interpreter", "e2bdev/code-interpreter"),
        description=(
            "base plus pandas, numpy, matplotlib, scikit-learn and E2B's other data packages, "
            "with Python, JavaScript, TypeScript, bash, R and Java kernels and charts, "
            "as a jail (E2B's code interpreter)"
        ),
    ),
}


def recipe(name: str) -> TemplateSpec:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownRecipe(name, list(RECIPES)) from None
