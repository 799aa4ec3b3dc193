"""The environment a command run through sudo starts with, by the defaults Debian's sudo
ships (`env_reset`, `secure_path`): a fresh environment for the target user that keeps only
the caller's terminal and locale settings; -E keeps all of the caller's environment instead,
--preserve-env=LIST the variables named."""

from __future__ import annotations

from collections.abc import Mapping

from coppice_agent.sudo_options import SudoOptions
from coppice_agent.users import SandboxUser

#: Debian's /etc/sudoers `secure_path`; it replaces PATH even under -E, as there
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What sudo's env_reset keeps from the caller by default (its env_keep and env_check
# tables): how the terminal looks and which language it speaks, nothing that changes what runs.
_KEPT = frozenset(
    {
        "COLORS",
        "COLORTERM",
        "DISPLAY",
        "HOSTNAME",
        "KRB5CCNAME",
        "LANG",
        "LANGUAGE",
        "LINGUAS",
        "LS_COLORS",
        "PS1",
        "PS2",
        "TERM",
        "TZ",
        "XAUTHORITY",
        "XAUTHORIZATION",
        "XDG_CURRENT_DESKTOP",
    }
)


def sudo_environment(
    options: SudoOptions,
    *,
    caller: SandboxUser,
    caller_env: Mapping[str, str],
    target: SandboxUser,
    command_line: str,
) -> dict[str, str]:
    # -i is a fresh login: the caller's environment is not carried into it even with -E.
    keep_all = options.preserve_all and not options.login
    if keep_all:
        env = dict(caller_env)
    else:
        env = {
            name: value
            for name, value in caller_env.items()
            if name in _KEPT or name.startswith("LC_") or name in options.preserve
        }
    home_kept = (keep_all or "HOME" in options.preserve) and "HOME" in env
    if options.set_home or options.login or not home_kept:
        env["HOME"] = target.home
    if not keep_all:
        env["SHELL"] = target.shell
        env["MAIL"] = f"/var/mail/{target.name}"
    env["USER"] = env["LOGNAME"] = target.name
    env["PATH"] = SECURE_PATH
    env.setdefault("TERM", "unknown")
    env["SUDO_COMMAND"] = command_line
    env["SUDO_USER"] = caller.name
    env["SUDO_UID"] = str(caller.uid)
    env["SUDO_GID"] = str(caller.gid)
    # `sudo VAR=value cmd`: allowed because every grant the broker honours is for ALL
    # commands, which sudoers treats as carrying SETENV.
    env.update(options.assignments)
    return env
