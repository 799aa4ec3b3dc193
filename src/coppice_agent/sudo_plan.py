"""What the sudo broker does for one request: answer it (help, a refusal, `-l`), or run a
command as the target account. Decided from the caller's account, its grant and the request;
nothing is started here, so every answer can be tested without a process."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coppice_agent.sudo_env import SECURE_PATH, sudo_environment
from coppice_agent.sudo_options import (
    HELP,
    VERSION,
    SudoOptions,
    SudoUsageError,
    parse_sudo_args,
)
from coppice_agent.sudoers import Grant
from coppice_agent.users import SandboxUser, UnknownUser

LookupUser = Callable[[str], SandboxUser]


@dataclass(frozen=True)
class SudoRequest:
    """What the /usr/bin/sudo shim sends: its arguments, working directory and environment."""

    args: list[str]
    cwd: str | None
    env: Mapping[str, str]


@dataclass(frozen=True)
class Answer:
    """Nothing runs: the shim prints these and exits with `status`."""

    status: int
    stdout: str = ""
    stderr: str = ""


@dataclass(frozen=True)
class Launch:
    """Run `executable` with `argv` as `user` (primary group `gid`, groups `groups`)."""

    executable: str
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    user: SandboxUser
    gid: int
    groups: tuple[int, ...]

    @property
    def command_line(self) -> str:
        return " ".join([self.executable, *self.argv[1:]])


class _Refusal(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def plan(
    request: SudoRequest,
    caller: SandboxUser,
    grant: Grant | None,
    *,
    hostname: str,
    lookup_user: LookupUser = SandboxUser.lookup,
) -> Answer | Launch:
    try:
        options = parse_sudo_args(request.args)
    except SudoUsageError as exc:
        return Answer(1, stderr=str(exc))
    if options.action == "help":
        return Answer(0, stdout=HELP)
    if options.action == "version":
        return Answer(0, stdout=VERSION)
    if options.action == "reset":
        return Answer(0)  # no cached credentials to forget: nothing is ever cached
    if grant is None:
        return Answer(1, stderr=refusal(caller, options))
    try:
        target, gid = _target(options, caller, grant, lookup_user, hostname)
        if options.action == "validate":
            return Answer(0)
        if options.action == "list":
            return _listing(options, caller, grant, hostname, request.cwd or "/")
        return _launch(options, request, caller, target, gid)
    except _Refusal as refused:
        return Answer(1, stderr=refused.message)


def refusal(caller: SandboxUser, options: SudoOptions) -> str:
    """What sudo says to someone it will not serve. With -n it cannot ask for the password it
    would have wanted first, and says only that; otherwise it names the account, as sudo
    does once the password has been given."""
    if options.non_interactive:
        return "sudo: a password is required\n"
    return f"{caller.name} is not in the sudoers file.\n"


def _target(
    options: SudoOptions,
    caller: SandboxUser,
    grant: Grant,
    lookup_user: LookupUser,
    hostname: str,
) -> tuple[SandboxUser, int]:
    # `sudo -g grp cmd` without -u changes only the group: the command runs as the caller.
    if options.user is not None:
        target = _lookup_target(options.user, lookup_user)
    elif options.group is not None:
        target = caller
    else:
        target = lookup_user("root")
    if options.group is None:
        return target, target.gid
    gid = _lookup_group(options.group)
    if gid != target.gid and not grant.any_group:
        command = " ".join(options.command) or "a shell"
        raise _Refusal(
            f"Sorry, user {caller.name} is not allowed to execute '{command}' as "
            f"{target.name}:{options.group} on {hostname}.\n"
        )
    return target, gid


def _lookup_target(spec: str, lookup_user: LookupUser) -> SandboxUser:
    """A name, or `#uid` as sudo accepts."""
    name = spec
    if spec.startswith("#") and spec[1:].isdigit():
        try:
            name = pwd.getpwuid(int(spec[1:])).pw_name
        except KeyError:
            raise _Refusal(f"sudo: unknown user {spec}\n") from None
    try:
        return lookup_user(name)
    except UnknownUser:
        raise _Refusal(f"sudo: unknown user {spec}\n") from None


def _lookup_group(spec: str) -> int:
    try:
        if spec.startswith("#") and spec[1:].isdigit():
            return grp.getgrgid(int(spec[1:])).gr_gid
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise _Refusal(f"sudo: unknown group {spec}\n") from None


def _listing(
    options: SudoOptions, caller: SandboxUser, grant: Grant, hostname: str, cwd: str
) -> Answer:
    if options.command:
        found = resolve_command(options.command[0], SECURE_PATH, cwd)
        if found is None:
            raise _Refusal(f"sudo: {options.command[0]}: command not found\n")
        return Answer(0, stdout=" ".join([found, *options.command[1:]]) + "\n")
    runas = "(ALL : ALL)" if grant.any_group else "(ALL)"
    return Answer(
        0,
        stdout=(
            f"User {caller.name} may run the following commands on {hostname}:\n"
            f"    {runas} NOPASSWD: ALL\n"
        ),
    )


def _launch(
    options: SudoOptions,
    request: SudoRequest,
    caller: SandboxUser,
    target: SandboxUser,
    gid: int,
) -> Launch:
    argv = _command_argv(options, request, caller, target)
    cwd = _working_directory(options, request, target)
    executable = resolve_command(argv[0], SECURE_PATH, cwd)
    if executable is None:
        raise _Refusal(f"sudo: {argv[0]}: command not found\n")
    env = sudo_environment(
        options,
        caller=caller,
        caller_env=request.env,
        target=target,
        command_line=" ".join([executable, *argv[1:]]),
    )
    # initgroups(3): the target's own groups, its primary one included, plus any -g group.
    groups = tuple(dict.fromkeys([gid, target.gid, *target.groups]))
    return Launch(executable, tuple(argv), env, cwd, target, gid, groups)


def _command_argv(
    options: SudoOptions, request: SudoRequest, caller: SandboxUser, target: SandboxUser
) -> list[str]:
    if not (options.login or options.shell):
        return list(options.command)
    # -s runs the caller's shell, as sudo does: $SHELL, else the caller's login shell.
    shell = [target.shell, "-l"] if options.login else [request.env.get("SHELL") or caller.shell]
    if options.command:
        shell += ["-c", shell_escape(options.command)]
    return shell


def shell_escape(command: Sequence[str]) -> str:
    """sudo's quoting of a command handed to a shell (-s, -i): every character but
    letters, digits, `_`, `-` and `$` gets a backslash, and the words are joined by spaces."""
    return " ".join(
        "".join(c if c.isalnum() or c in "_-$" else f"\\{c}" for c in word) for word in command
    )


def _working_directory(options: SudoOptions, request: SudoRequest, target: SandboxUser) -> str:
    base = request.cwd if request.cwd and Path(request.cwd).is_dir() else "/"
    if options.chdir is not None:
        wanted = os.path.join(base, options.chdir)
        if not Path(wanted).is_dir():
            raise _Refusal(
                f"sudo: unable to change directory to {options.chdir}: No such file or directory\n"
            )
        return wanted
    if options.login:
        # A login shell starts at home, like login(1); a missing home starts at /.
        return target.home if Path(target.home).is_dir() else "/"
    return base


def resolve_command(name: str, search_path: str, cwd: str) -> str | None:
    """The file sudo would execute for `name`: a name with a `/` relative to `cwd`,
    otherwise the first executable match in `search_path`."""
    if "/" in name:
        candidates = [os.path.join(cwd, name)]
    else:
        candidates = [os.path.join(d, name) for d in search_path.split(":") if d]
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None
