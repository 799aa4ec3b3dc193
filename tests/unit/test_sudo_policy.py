"""The sudo broker's decisions without a process: the command line, the sudoers grants, the
environment and what each request comes to."""

from __future__ import annotations

import dataclasses
import grp
from pathlib import Path

import pytest

from coppice_agent.sudo_env import SECURE_PATH, sudo_environment
from coppice_agent.sudo_options import USAGE, SudoOptions, SudoUsageError, parse_sudo_args
from coppice_agent.sudo_plan import Answer, Launch, SudoRequest, plan, shell_escape
from coppice_agent.sudoers import ROOT_GRANT, Grant, SudoersFiles, grant_for
from coppice_agent.users import SandboxUser, UnknownUser

NOGROUP = grp.getgrnam("nogroup").gr_gid
ROOT = SandboxUser("root", 0, 0, "/root", "/bin/bash", ())
ALICE = SandboxUser("alice", 1000, 1000, "/home/alice", "/bin/bash", (NOGROUP,))
BOB = SandboxUser("bob", 1001, 1001, "/home/bob", "/bin/sh", ())
ACCOUNTS = {u.name: u for u in (ROOT, ALICE, BOB)}


def lookup(name: str) -> SandboxUser:
    try:
        return ACCOUNTS[name]
    except KeyError:
        raise UnknownUser(name) from None


# -- the command line ----------------------------------------------------------------------


def test_options_end_at_the_command() -> None:
    options = parse_sudo_args(["-n", "ls", "-l", "-u", "x"])
    assert options == SudoOptions(command=("ls", "-l", "-u", "x"), non_interactive=True)


@pytest.mark.parametrize(
    "args",
    [["-u", "bob", "id"], ["-ubob", "id"], ["-nu", "bob", "id"], ["--user=bob", "id"],
     ["--user", "bob", "id"]],
)  # fmt: skip
def test_the_target_user_every_way_it_is_spelled(args: list[str]) -> None:
    options = parse_sudo_args(args)
    assert (options.user, options.command) == ("bob", ("id",))


def test_assignments_before_the_command_and_double_dash() -> None:
    options = parse_sudo_args(["-E", "--", "A=1", "B=x=y", "env", "C=2"])
    assert options.preserve_all
    assert options.assignments == (("A", "1"), ("B", "x=y"))
    assert options.command == ("env", "C=2")


def test_preserve_env_with_a_list() -> None:
    options = parse_sudo_args(["--preserve-env=HOME,FOO", "env"])
    assert (options.preserve_all, options.preserve) == (False, frozenset({"HOME", "FOO"}))


@pytest.mark.parametrize(
    ("args", "action"),
    [(["-v"], "validate"), (["-l"], "list"), (["-l", "id"], "list"), (["-k"], "reset"),
     (["-K"], "reset"), (["-k", "id"], "run"), (["-h"], "help"), (["-V"], "version"),
     (["-i"], "run"), (["-s"], "run")],
)  # fmt: skip
def test_modes(args: list[str], action: str) -> None:
    assert parse_sudo_args(args).action == action


@pytest.mark.parametrize(
    ("args", "message"),
    [([], USAGE), (["-x"], "sudo: invalid option -- 'x'\n"),
     (["-i", "-s"], "sudo: you may not specify both the -i and -s options\n"),
     (["-u"], "sudo: option requires an argument -- 'u'\n"),
     (["--frobnicate"], "sudo: unrecognized option '--frobnicate'\n"),
     (["-v", "id"], "sudo: the -v option does not take a command\n"),
     (["-e", "/etc/hosts"], "sudo: option -e is not supported by Coppice's sudo\n")],
)  # fmt: skip
def test_usage_errors(args: list[str], message: str) -> None:
    with pytest.raises(SudoUsageError) as raised:
        parse_sudo_args(args)
    assert str(raised.value).startswith(message)


# -- sudoers ---------------------------------------------------------------------------------


def sudoers(tmp_path: Path, main: str, **extra: str) -> SudoersFiles:
    (tmp_path / "sudoers").write_text(main)
    (tmp_path / "sudoers.d").mkdir()
    for name, text in extra.items():
        (tmp_path / "sudoers.d" / name.replace("_", ".")).write_text(text)
    return SudoersFiles(tmp_path / "sudoers", tmp_path / "sudoers.d")


@pytest.mark.parametrize(
    ("line", "grant"),
    [("alice ALL=(ALL:ALL) NOPASSWD: ALL", Grant(any_group=True)),
     ("alice  ALL = (ALL) NOPASSWD:ALL  # comment", Grant(any_group=False)),
     ("bob, alice ALL=(ALL : ALL) NOPASSWD: ALL", Grant(any_group=True)),
     ("ALL ALL=(ALL:ALL) NOPASSWD: ALL", Grant(any_group=True)),
     ("%nogroup ALL=(ALL:ALL) NOPASSWD: ALL", Grant(any_group=True)),
     # a password, a narrower rule, another account, a comment: nothing
     ("alice ALL=(ALL:ALL) ALL", None), ("alice ALL=(root) NOPASSWD: ALL", None),
     ("alice ALL=(ALL) NOPASSWD: /usr/bin/apt", None), ("bob ALL=(ALL) NOPASSWD: ALL", None),
     ("# alice ALL=(ALL) NOPASSWD: ALL", None), ("%sudo ALL=(ALL:ALL) NOPASSWD: ALL", None)],
)  # fmt: skip
def test_the_one_grant_form(tmp_path: Path, line: str, grant: Grant | None) -> None:
    assert grant_for(ALICE, sudoers(tmp_path, f"Defaults env_reset\n{line}\n")) == grant


def test_sudoers_d_is_read_but_not_its_backups(tmp_path: Path) -> None:
    rule = "alice ALL=(ALL:ALL) NOPASSWD: ALL\n"
    files = sudoers(tmp_path, "", **{"old~": rule, "x_dpkg-old": rule})
    assert grant_for(ALICE, files) is None
    (files.directory / "coppice-user").write_text(rule)
    assert grant_for(ALICE, files) == Grant(any_group=True)


def test_root_needs_no_grant(tmp_path: Path) -> None:
    assert grant_for(ROOT, SudoersFiles(tmp_path / "none", tmp_path / "none.d")) == ROOT_GRANT


# -- the environment -------------------------------------------------------------------------


CALLER_ENV = {"HOME": "/home/alice", "PATH": "/opt/venv/bin:/usr/bin", "FOO": "1",
              "TERM": "xterm", "LC_ALL": "C.UTF-8", "SHELL": "/bin/dash"}  # fmt: skip


def environment(args: list[str]) -> dict[str, str]:
    return sudo_environment(
        parse_sudo_args(args),
        caller=ALICE,
        caller_env=CALLER_ENV,
        target=ROOT,
        command_line="/usr/bin/env",
    )


def test_the_environment_is_reset_for_the_target() -> None:
    assert environment(["env"]) == {
        "TERM": "xterm",
        "LC_ALL": "C.UTF-8",
        "HOME": "/root",
        "SHELL": "/bin/bash",
        "MAIL": "/var/mail/root",
        "USER": "root",
        "LOGNAME": "root",
        "PATH": SECURE_PATH,
        "SUDO_COMMAND": "/usr/bin/env",
        "SUDO_USER": "alice",
        "SUDO_UID": "1000",
        "SUDO_GID": "1000",
    }


def test_preserving_keeps_the_callers_but_not_its_path() -> None:
    kept = environment(["-E", "env"])
    assert (kept["FOO"], kept["HOME"], kept["SHELL"], kept["USER"]) == (
        "1",
        "/home/alice",
        "/bin/dash",
        "root",
    )
    assert kept["PATH"] == SECURE_PATH
    assert environment(["-E", "-H", "env"])["HOME"] == "/root"
    listed = environment(["--preserve-env=FOO", "env"])
    assert (listed["FOO"], listed["HOME"]) == ("1", "/root")
    assert environment(["FOO=2", "PATH=/x", "env"])["FOO"] == "2"


# -- what a request comes to -----------------------------------------------------------------


def decide(args: list[str], caller: SandboxUser = ALICE, grant: Grant | None = ROOT_GRANT,
           cwd: str = "/") -> Answer | Launch:  # fmt: skip
    request = SudoRequest(args=args, cwd=cwd, env=CALLER_ENV)
    return plan(request, caller, grant, hostname="sbx", lookup_user=lookup)


def test_a_granted_command_runs_as_root_with_initgroups() -> None:
    launch = decide(["-n", "id", "-u"])
    assert isinstance(launch, Launch)
    assert (launch.executable, launch.argv, launch.cwd) == ("/usr/bin/id", ("id", "-u"), "/")
    assert (launch.user, launch.gid, launch.groups) == (ROOT, 0, (0,))


def test_another_user_and_group() -> None:
    launch = decide(["-u", "bob", "-g", "nogroup", "id"])
    assert isinstance(launch, Launch)
    assert (launch.user, launch.gid, launch.groups) == (BOB, NOGROUP, (NOGROUP, 1001))
    alone = decide(["-g", "nogroup", "id"])
    assert isinstance(alone, Launch)
    assert alone.user == ALICE  # -g alone keeps the caller


@pytest.mark.parametrize(
    ("args", "grant", "stderr"),
    [(["id"], None, "alice is not in the sudoers file.\n"),
     (["-n", "id"], None, "sudo: a password is required\n"),
     (["-u", "nosuch", "id"], ROOT_GRANT, "sudo: unknown user nosuch\n"),
     (["-g", "nosuch", "id"], ROOT_GRANT, "sudo: unknown group nosuch\n"),
     (["-g", "nogroup", "id"], Grant(any_group=False),
      "Sorry, user alice is not allowed to execute 'id' as alice:nogroup on sbx.\n"),
     (["no-such-command"], ROOT_GRANT, "sudo: no-such-command: command not found\n"),
     (["-D", "/nonexistent", "id"], ROOT_GRANT,
      "sudo: unable to change directory to /nonexistent: No such file or directory\n")],
)  # fmt: skip
def test_refusals(args: list[str], grant: Grant | None, stderr: str) -> None:
    assert decide(args, grant=grant) == Answer(1, stderr=stderr)


def test_help_and_reset_need_no_grant() -> None:
    help_answer = decide(["-h"], grant=None)
    assert isinstance(help_answer, Answer)
    assert help_answer.status == 0
    assert help_answer.stdout.startswith("sudo - execute a command")
    assert decide(["-k"], grant=None) == Answer(0)


def test_list_and_validate() -> None:
    assert decide(["-v"]) == Answer(0)
    assert decide(["-l"], grant=Grant(any_group=False)) == Answer(
        0, stdout="User alice may run the following commands on sbx:\n    (ALL) NOPASSWD: ALL\n"
    )
    assert decide(["-l", "id", "-u"]) == Answer(0, stdout="/usr/bin/id -u\n")


def test_a_login_shell_starts_at_the_targets_home() -> None:
    launch = decide(["-i"], cwd="/tmp")
    assert isinstance(launch, Launch)
    assert (launch.argv, launch.cwd) == (("/bin/bash", "-l"), "/root")
    assert launch.env["HOME"] == "/root"
    with_command = decide(["-i", "echo", "a b"])
    assert isinstance(with_command, Launch)
    assert with_command.argv == ("/bin/bash", "-l", "-c", "echo a\\ b")


def test_a_shell_is_the_callers_in_its_directory() -> None:
    launch = decide(["-s", "ls", "*.txt"], cwd="/tmp")
    assert isinstance(launch, Launch)
    assert (launch.argv, launch.cwd) == (("/bin/dash", "-c", "ls \\*\\.txt"), "/tmp")


def test_a_vanished_working_directory_falls_back_to_root() -> None:
    launch = decide(["id"], cwd="/nonexistent")
    assert isinstance(launch, Launch)
    assert launch.cwd == "/"


def test_shell_escape_keeps_variables() -> None:
    assert shell_escape(["echo", "$HOME", "it's"]) == "echo $HOME it\\'s"


def test_a_relative_command_is_found_from_the_working_directory(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    launch = decide(["./run.sh"], cwd=str(tmp_path))
    assert isinstance(launch, Launch)
    assert launch.executable == f"{tmp_path}/./run.sh"
    assert dataclasses.replace(launch, env={}).argv == ("./run.sh",)
