"""What a forked entry is, as data: the request the host sends for it (decoded from a wire
message) and the steps that build its root before pivot_root. Pure: `child.py` performs the
steps, the unit tests read them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coppice_agent.zygote import linux

#: where the entry's root is put together, in the child's own mount namespace (on a tmpfs
#: of its own over the zygote's /tmp, so nothing of it shows in the zygote's)
STAGING = "/tmp"
NEW_ROOT = "/tmp/root"
#: the device nodes a jail gets, bound from the zygote's /dev (bwrap's, the host's nodes)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
)


class BadRequest(ValueError):
    """A request that does not say what an entry needs."""


@dataclass(frozen=True)
class EntryRequest:
    """One entry to fork, as the host asks for it. The descriptors are the child's to use
    and close: its root (a detached mount tree of its overlay), its console log, the socket
    it reports to, its seccomp program, its cgroups' cgroup.procs files and the lxcfs files
    to show over /proc (detached trees too)."""

    entry_id: str
    hostname: str
    shm_bytes: int
    run_bytes: int
    capabilities: tuple[str, ...]
    uid_count: int
    root_fd: int
    console_fd: int
    report_fd: int
    seccomp_fd: int
    cgroup_fds: tuple[int, ...]
    proc_fds: Mapping[str, int] = field(default_factory=dict)

    @property
    def fds(self) -> list[int]:
        return [
            self.root_fd,
            self.console_fd,
            self.report_fd,
            self.seccomp_fd,
            *self.cgroup_fds,
            *self.proc_fds.values(),
        ]

    @classmethod
    def decode(cls, body: Mapping[str, Any], fds: Sequence[int]) -> EntryRequest:
        roles = body.get("fds")
        if not isinstance(roles, list) or len(roles) != len(fds):
            raise BadRequest("the fds list does not match the descriptors sent")
        by_role: dict[str, int] = {}
        cgroups: list[int] = []
        procs: dict[str, int] = {}
        for role, fd in zip(roles, fds, strict=True):
            if role == "cgroup":
                cgroups.append(fd)
            elif isinstance(role, str) and role.startswith("proc:"):
                name = role[len("proc:") :]
                if not name or "/" in name or name.startswith("."):
                    raise BadRequest(f"bad /proc file name {name!r}")
                procs[name] = fd
            elif role in ("root", "console", "report", "seccomp") and role not in by_role:
                by_role[role] = fd
            else:
                raise BadRequest(f"unknown or repeated descriptor role {role!r}")
        missing = {"root", "console", "report", "seccomp"} - by_role.keys()
        if missing:
            raise BadRequest(f"missing descriptors: {', '.join(sorted(missing))}")
        caps = tuple(body.get("capabilities", ()))
        unknown = [c for c in caps if c not in linux.CAPABILITY_NUMBERS]
        if unknown:
            raise BadRequest(f"unknown capabilities {unknown}")
        try:
            return cls(
                entry_id=str(body["entry_id"]),
                hostname=str(body["hostname"]),
                shm_bytes=int(body["shm_bytes"]),
                run_bytes=int(body["run_bytes"]),
                capabilities=caps,
                uid_count=int(body["uid_count"]),
                root_fd=by_role["root"],
                console_fd=by_role["console"],
                report_fd=by_role["report"],
                seccomp_fd=by_role["seccomp"],
                cgroup_fds=tuple(cgroups),
                proc_fds=procs,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"bad entry request: {exc!r}") from exc


# -- the steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tmpfs:
    target: str
    options: str
    flags: int = linux.MS_NOSUID | linux.MS_NODEV


@dataclass(frozen=True)
class Attach:
    """move_mount a detached tree (a descriptor the host sent) onto `target`."""

    fd: int
    target: str


@dataclass(frozen=True)
class Bind:
    source: str
    target: str


@dataclass(frozen=True)
class Proc:
    target: str


@dataclass(frozen=True)
class Devpts:
    target: str


@dataclass(frozen=True)
class MakeDir:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class MakeFile:
    """An empty file to bind a device node over."""

    path: str


@dataclass(frozen=True)
class Symlink:
    path: str
    points_to: str


@dataclass(frozen=True)
class RemountReadOnly:
    target: str
    flags: int = linux.MS_NOSUID


Step = Tmpfs | Attach | Bind | Proc | Devpts | MakeDir | MakeFile | Symlink | RemountReadOnly


def root_steps(request: EntryRequest) -> list[Step]:
    """The entry's root, as bwrap builds a jail's: its overlay at /, a /proc of its own pid
    namespace with lxcfs's files over it, a /dev of the usual nodes with a devpts and a
    bounded /dev/shm of its own (read-only once built), and a bounded /run. Run by the
    entry's PID 1, after pivot nothing else of the zygote's mounts stays."""
    root = NEW_ROOT
    steps: list[Step] = [
        Tmpfs(STAGING, "mode=0700,size=65536"),
        MakeDir(root),
        Attach(request.root_fd, root),
        Proc(f"{root}/proc"),
    ]
    steps += [Attach(fd, f"{root}/proc/{name}") for name, fd in sorted(request.proc_fds.items())]
    dev = f"{root}/dev"
    steps.append(Tmpfs(dev, "mode=0755", linux.MS_NOSUID))
    for node in DEVICES:
        steps += [MakeFile(f"{dev}/{node}"), Bind(f"/dev/{node}", f"{dev}/{node}")]
    steps += [MakeDir(f"{dev}/pts"), Devpts(f"{dev}/pts")]
    steps += [Symlink(f"{dev}/{name}", target) for name, target in DEV_LINKS]
    steps += [
        MakeDir(f"{dev}/shm"),
        Tmpfs(f"{dev}/shm", f"mode=1777,size={request.shm_bytes}"),
        RemountReadOnly(dev),
        Tmpfs(f"{root}/run", f"mode=0755,size={request.run_bytes}"),
    ]
    return steps


def capability_numbers(names: Sequence[str]) -> frozenset[int]:
    return frozenset(linux.CAPABILITY_NUMBERS[name] for name in names)
