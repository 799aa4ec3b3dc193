"""What a `sudo` command line asks for: the options people actually use, parsed as sudo(8)
parses them (options end at the first argument that is not one, then `VAR=value`
assignments, then the command). Pure: no accounts, no files.

The broker parses, not the /usr/bin/sudo shim, so that there is one parser, typed and
tested with the agent, and the shim stays a thin pipe."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["run", "validate", "list", "reset", "help", "version"]

USAGE = """\
usage: sudo -h | -K | -k | -V
usage: sudo -v [-kn] [-g group] [-u user]
usage: sudo -l [-kn] [-g group] [-u user] [command [arg ...]]
usage: sudo [-EHkn] [-D directory] [-g group] [-u user] [VAR=value] [-i | -s] [command [arg ...]]
"""

HELP = f"""\
sudo - execute a command as another user (Coppice's sudo broker)

{USAGE}
Options:
  -D, --chdir=directory         change the working directory before running command
  -E, --preserve-env            preserve the user's environment
      --preserve-env=list       preserve specific environment variables
  -g, --group=group             run command as the specified group name or ID
  -H, --set-home                set HOME variable to target user's home dir
  -h, --help                    display help message and exit
  -i, --login                   run login shell as the target user; a command may also be
                                specified
  -K, --remove-timestamp        remove timestamp file completely
  -k, --reset-timestamp         invalidate timestamp file
  -l, --list                    list the user's privileges or check a specific command
  -n, --non-interactive         non-interactive mode, no prompts are used
  -s, --shell                   run shell as the target user; a command may also be specified
  -u, --user=user               run command (or edit file) as specified user name or ID
  -V, --version                 display version information and exit
  -v, --validate                update user's timestamp without running a command
  --                            stop processing command line arguments
"""

VERSION = "Sudo version 1.9.13p3 (Coppice sudo broker: NOPASSWD sudoers grants)\n"

# -S (read the password from stdin), -A (askpass) and -p (prompt) are accepted and do
# nothing: a sandbox has no passwords to read or prompt for.
# Real sudo features the broker does not have; refused by name rather than misread.
_UNSUPPORTED = {"b", "e", "P", "C", "T", "U", "r", "t", "R", "N"}
_LONG_FLAGS = {
    "non-interactive": "n",
    "preserve-env": "E",
    "login": "i",
    "shell": "s",
    "set-home": "H",
    "reset-timestamp": "k",
    "remove-timestamp": "K",
    "validate": "v",
    "list": "l",
    "help": "h",
    "version": "V",
    "stdin": "S",
    "askpass": "A",
}
_LONG_WITH_VALUE = {"user": "u", "group": "g", "chdir": "D", "prompt": "p"}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


class SudoUsageError(ValueError):
    """A command line sudo would reject; `str()` is what to print on stderr (exit 1)."""


@dataclass(frozen=True)
class SudoOptions:
    action: Action = "run"
    command: tuple[str, ...] = ()
    user: str | None = None
    group: str | None = None
    non_interactive: bool = False
    #: -E: keep the whole caller's environment
    preserve_all: bool = False
    #: --preserve-env=A,B: keep these variables too
    preserve: frozenset[str] = field(default_factory=frozenset)
    login: bool = False
    shell: bool = False
    set_home: bool = False
    chdir: str | None = None
    #: `sudo VAR=value cmd`, in order
    assignments: tuple[tuple[str, str], ...] = ()


@dataclass
class _Parsed:
    flags: set[str] = field(default_factory=set)
    values: dict[str, str] = field(default_factory=dict)
    preserve: set[str] = field(default_factory=set)


def parse_sudo_args(args: list[str]) -> SudoOptions:
    """`args` is sudo's argv without argv[0]. Raises SudoUsageError."""
    parsed = _Parsed()
    rest = _parse_options(args, parsed)
    assignments: list[tuple[str, str]] = []
    while rest and _ASSIGNMENT.match(rest[0]):
        name, _, value = rest.pop(0).partition("=")
        assignments.append((name, value))
    return _build(parsed, tuple(rest), tuple(assignments))


def _parse_options(args: list[str], parsed: _Parsed) -> list[str]:
    """Consume the options; return what follows them."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return args[i + 1 :]
        if arg.startswith("--"):
            i = _parse_long(args, i, parsed)
        elif arg.startswith("-") and arg != "-":
            i = _parse_short(args, i, parsed)
        else:
            return args[i:]
    return []


def _parse_long(args: list[str], i: int, parsed: _Parsed) -> int:
    name, has_value, value = args[i][2:].partition("=")
    if name == "preserve-env" and has_value:
        parsed.preserve.update(v for v in value.split(",") if v)
        return i + 1
    if name in _LONG_FLAGS:
        if has_value:
            raise _usage(f"option '--{name}' doesn't allow an argument")
        parsed.flags.add(_LONG_FLAGS[name])
        return i + 1
    if name in _LONG_WITH_VALUE:
        if not has_value:
            if i + 1 >= len(args):
                raise _usage(f"option '--{name}' requires an argument")
            value = args[i + 1]
            i += 1
        parsed.values[_LONG_WITH_VALUE[name]] = value
        return i + 1
    raise _usage(f"unrecognized option '--{name}'")


def _parse_short(args: list[str], i: int, parsed: _Parsed) -> int:
    """One cluster such as `-nu` `root` or `-uroot`."""
    cluster = args[i][1:]
    for pos, letter in enumerate(cluster):
        if letter in "ugDp":
            value = cluster[pos + 1 :]
            if not value:
                if i + 1 >= len(args):
                    raise _usage(f"option requires an argument -- '{letter}'")
                value = args[i + 1]
                i += 1
            parsed.values[letter] = value
            return i + 1
        if letter in _UNSUPPORTED:
            raise SudoUsageError(f"sudo: option -{letter} is not supported by Coppice's sudo\n")
        if letter not in "nEisHkKvlhVSA":
            raise _usage(f"invalid option -- '{letter}'")
        parsed.flags.add(letter)
    return i + 1


def _build(
    parsed: _Parsed, command: tuple[str, ...], assignments: tuple[tuple[str, str], ...]
) -> SudoOptions:
    flags = parsed.flags
    modes = [m for m in "hVKvl" if m in flags]
    if len(modes) > 1:
        raise _usage(f"only one of the -{' -'.join(modes)} options may be specified")
    if "i" in flags and "s" in flags:
        raise SudoUsageError("sudo: you may not specify both the -i and -s options\n")
    action = _action(modes[0] if modes else ("k" if "k" in flags else None), command, parsed)
    return SudoOptions(
        action=action,
        command=command,
        user=parsed.values.get("u"),
        group=parsed.values.get("g"),
        non_interactive="n" in flags,
        preserve_all="E" in flags,
        preserve=frozenset(parsed.preserve),
        login="i" in flags,
        shell="s" in flags,
        set_home="H" in flags,
        chdir=parsed.values.get("D"),
        assignments=assignments,
    )


def _action(mode: str | None, command: tuple[str, ...], parsed: _Parsed) -> Action:
    shell_wanted = "i" in parsed.flags or "s" in parsed.flags
    if mode in ("h", "V", "K", "v") and (command or shell_wanted):
        raise _usage(f"the -{mode} option does not take a command")
    if mode == "h":
        return "help"
    if mode == "V":
        return "version"
    if mode == "K":
        return "reset"
    if mode == "v":
        return "validate"
    if mode == "l":
        return "list"
    if not command and not shell_wanted:
        # `sudo -k` alone forgets cached credentials; with a command it just runs it.
        if mode == "k":
            return "reset"
        raise SudoUsageError(USAGE)
    return "run"


def _usage(problem: str) -> SudoUsageError:
    return SudoUsageError(f"sudo: {problem}\n{USAGE}")
