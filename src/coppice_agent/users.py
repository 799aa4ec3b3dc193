"""Who a request acts as: the user named by `Authorization: Basic base64("<user>:")` on RPCs
or `username=` on /files, else the sandbox's default user."""

from __future__ import annotations

import base64
import binascii
import grp
import os
import pwd
from dataclasses import dataclass


class UnknownUser(ValueError):
    pass


@dataclass(frozen=True)
class SandboxUser:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> SandboxUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise UnknownUser(f"user {name!r} does not exist in this sandbox") from None
        groups = tuple(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
        return cls(
            name=name,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            home=entry.pw_dir,
            shell=entry.pw_shell or "/bin/sh",
            groups=groups,
        )

    @property
    def is_current(self) -> bool:
        """True when the agent already runs as this user (then no uid switch is needed)."""
        return os.geteuid() == self.uid

    def base_env(self) -> dict[str, str]:
        """The login environment every process of this user starts from."""
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        if self.uid != 0:
            path = "/usr/local/bin:/usr/bin:/bin"
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": self.shell,
            "PATH": path,
            "LANG": "C.UTF-8",
        }


def user_from_basic_auth(header: str | None) -> str | None:
    """The user name in an `Authorization: Basic` header (password ignored), or None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    name = decoded.partition(":")[0]
    return name or None
