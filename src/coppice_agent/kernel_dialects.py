"""The agent's own bookkeeping cells in each kernel's language.

The agent changes a running kernel's environment variables (per execution `env_vars`, and
the sandbox's variables pushed in at checkout) by running a silent cell in the kernel. For
Python that is kernels.py's own code; this is the same for the other languages E2B's code
interpreter offers. Every cell leaves no names behind in the user's namespace.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Mapping, Sequence

_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

EnvCode = Callable[[Mapping[str, str], Sequence[str]], str]


def _javascript(set_values: Mapping[str, str], unset: Sequence[str]) -> str:
    # JSON is a JavaScript literal; an arrow function keeps `k` out of the global scope.
    return (
        f"(() => {{ Object.assign(process.env, {json.dumps(dict(set_values))});"
        f" for (const k of {json.dumps(list(unset))}) delete process.env[k]; }})()"
    )


def _typescript(set_values: Mapping[str, str], unset: Sequence[str]) -> str:
    # The same, typed so that tslab's type check lets it through.
    return (
        f"(() => {{ const s: Record<string, string> = {json.dumps(dict(set_values))};"
        " Object.assign(process.env, s);"
        f" const u: string[] = {json.dumps(list(unset))};"
        " for (const k of u) delete process.env[k]; })()"
    )


def _bash(set_values: Mapping[str, str], unset: Sequence[str]) -> str:
    # bash cannot hold a variable whose name is not an identifier; such names are skipped.
    lines = [f"export {k}={shlex.quote(v)}" for k, v in set_values.items() if _SHELL_NAME.match(k)]
    names = [k for k in unset if _SHELL_NAME.match(k)]
    if names:
        lines.append("unset " + " ".join(names))
    return "\n".join(lines) or ":"


def _r_strings(values: Sequence[str]) -> str:
    # A JSON string is an R string literal too (the same escapes, \uXXXX included).
    return "c(" + ", ".join(json.dumps(v) for v in values) + ")"


def _r(set_values: Mapping[str, str], unset: Sequence[str]) -> str:
    cells = []
    if set_values:
        names, values = _r_strings(list(set_values)), _r_strings(list(set_values.values()))
        cells.append(f"invisible(do.call(Sys.setenv, as.list(setNames({values}, {names}))))")
    if unset:
        cells.append(f"invisible(Sys.unsetenv({_r_strings(list(unset))}))")
    return "\n".join(cells) or "invisible(NULL)"


# Java cannot change its own process environment (System.getenv is read-only), so a Java
# kernel has none: it starts with the sandbox's variables and keeps them.
_ENV_CODE: Mapping[str, EnvCode] = {
    "javascript": _javascript,
    "typescript": _typescript,
    "bash": _bash,
    "r": _r,
}


def env_code(language: str) -> EnvCode | None:
    """How to change environment variables in a kernel of `language` (not Python, whose
    code is kernels.py's), or None when its kernels cannot."""
    return _ENV_CODE.get(language)
