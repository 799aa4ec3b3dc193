"""Who may use the sudo broker: the accounts /etc/sudoers (and /etc/sudoers.d) grants
passwordless sudo for everything, in its one simple form

    NAME  ALL=(ALL:ALL) NOPASSWD: ALL      or  ALL=(ALL) NOPASSWD: ALL
    %GROUP ALL=(ALL:ALL) NOPASSWD: ALL

(several names may be given, comma separated; `ALL` names everyone). Anything else in
those files grants nothing here: a sandbox has no passwords to ask for, and a rule the broker
would have to interpret is one it could interpret wrongly, so it denies instead.

The files are read on every request, as sudo does: a grant added or removed inside the
sandbox takes effect at the next `sudo`."""

from __future__ import annotations

import grp
import re
from dataclasses import dataclass
from pathlib import Path

from coppice_agent.users import SandboxUser

_RULE = re.compile(
    r"(?P<who>\S+(?:\s*,\s*\S+)*)\s+ALL\s*=\s*\(\s*ALL\s*(?P<group>:\s*ALL\s*)?\)"
    r"\s*NOPASSWD\s*:\s*ALL"
)
# A comment starts at a `#` that follows whitespace; one at the start of a line is either a
# comment or a directive (#include, #includedir), and neither is a grant.
_TRAILING_COMMENT = re.compile(r"\s#.*$")


@dataclass(frozen=True)
class Grant:
    """Passwordless sudo for every command, as any user; with `(ALL:ALL)` as any group too."""

    any_group: bool


ROOT_GRANT = Grant(any_group=True)


@dataclass(frozen=True)
class SudoersFiles:
    main: Path = Path("/etc/sudoers")
    directory: Path = Path("/etc/sudoers.d")

    def lines(self) -> list[str]:
        """Every line of the grants; a file that cannot be read grants nothing."""
        lines: list[str] = []
        for path in [self.main, *self._directory_files()]:
            try:
                lines += path.read_text(errors="replace").splitlines()
            except OSError:
                continue
        return lines

    def _directory_files(self) -> list[Path]:
        # sudo's own rule for sudoers.d: names ending in `~` or containing a `.` are skipped
        # (editor backups, package manager leftovers such as `x.dpkg-old`).
        try:
            paths = sorted(self.directory.iterdir())
        except OSError:
            return []
        return [p for p in paths if not p.name.endswith("~") and "." not in p.name]


def grant_for(user: SandboxUser, files: SudoersFiles) -> Grant | None:
    """The grant `user` holds, or None. Root always holds one, as sudo's own policy has it."""
    if user.uid == 0:
        return ROOT_GRANT
    names = {user.name, "ALL"} | {f"%{g}" for g in _group_names(user)}
    found: Grant | None = None
    for line in files.lines():
        rule = _parse_rule(line)
        if rule is None:
            continue
        who, grant = rule
        if who & names:
            found = Grant(any_group=grant.any_group or (found is not None and found.any_group))
    return found


def _parse_rule(line: str) -> tuple[set[str], Grant] | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    match = _RULE.fullmatch(_TRAILING_COMMENT.sub("", line).rstrip())
    if match is None:
        return None
    who = {part.strip() for part in match["who"].split(",")}
    return who, Grant(any_group=match["group"] is not None)


def _group_names(user: SandboxUser) -> set[str]:
    names: set[str] = set()
    for gid in {user.gid, *user.groups}:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return names
