"""The seccomp filter every jail runs under, compiled once to classic BPF for `bwrap --seccomp`.

Default allow, with a deny list in the spirit of Docker's default profile: the calls that reach
kernel-wide state (modules, kexec, bpf, perf, keyrings, clocks, swap, reboot), that build new
mounts or namespaces (the jail's own are made before the filter applies), or that have a long
record of privilege-escalation bugs (userfaultfd, open_by_handle_at). Other architectures'
system-call tables are killed outright by libseccomp's default bad-arch action.
"""

from __future__ import annotations

import errno
import hashlib
import tempfile
from pathlib import Path

import pyseccomp

DENIED_SYSCALLS: tuple[str, ...] = (
    # kernel modules and kexec
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    # eBPF and perf: large kernel attack surface, and perf reads host-wide state
    "bpf",
    "perf_event_open",
    # kernel keyrings are not namespaced
    "keyctl",
    "add_key",
    "request_key",
    # mounts and namespaces
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    # host-wide clocks, swap, power, accounting, quotas, raw I/O ports
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "iopl",
    "ioperm",
    "syslog",
    "vhangup",
    # historically exploitable or obsolete
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "uselib",
    "nfsservctl",
)

# clone(2) flags that would create a namespace; clone3 hides its flags in memory the filter
# cannot read, so it answers ENOSYS and libc falls back to clone(2), which the filter can see.
_NAMESPACE_CLONE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)


#: what a template's zygote may do beyond a jail: its forks make their namespaces and build
#: their root before they load the jail's own filter over this one
ZYGOTE_ALLOWED: frozenset[str] = frozenset(
    {"mount", "umount2", "pivot_root", "move_mount", "unshare", "setns"}
)


def compile_filter(zygote: bool = False) -> bytes:
    """The filter as the raw BPF program bwrap reads from a file descriptor; `zygote`: the
    zygote's (see ZYGOTE_ALLOWED)."""
    f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    deny = pyseccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        if not (zygote and name in ZYGOTE_ALLOWED):
            f.add_rule(deny, name)
    if not zygote:
        for flag in _NAMESPACE_CLONE_FLAGS:
            f.add_rule(deny, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    f.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:  # export_bpf writes to a real file descriptor
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def ensure_filter_file(directory: Path, zygote: bool = False) -> Path:
    """Write the compiled filter under `directory` (content-addressed) and return its path."""
    program = compile_filter(zygote)
    digest = hashlib.sha256(program).hexdigest()[:16]
    path = directory / f"seccomp-{digest}.bpf"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(program)
        tmp.replace(path)
    return path
