"""The `jail` substrate: Linux namespaces + cgroups + seccomp + an overlayfs root.

Per entry, on the host:
  /var/lib/coppice/entry-disks/<id>.img   a sparse ext4 image as large as the entry's disk
                                      limit, on a loop device (see entry_disk), mounted at
  /run/coppice/entries/<id>/          the entry's directory, holding
      upper/ work/ merged/            the overlay (template rootfs below, the disk above)
      console.log                     the jail's stdout/stderr, outside its reach
  /run/netns/<ns>-<id>                its network namespace (veth `copp<id>` on the bridge)
  /sys/fs/cgroup/.../<ns>/<id>        memory, pids, cpu and freezer limits

The launch is a chain of execs, so the recorded pid stays the jail's top process:
  nsenter --net=<netns>               enter the entry's network namespace
  sh -c 'join cgroups; exec ...'      so everything that follows is accounted and freezable
  unshare --user --map-users ...      root inside = uid <base> outside (newuidmap/newgidmap)
  bwrap ...                           mount, pid, ipc, uts, cgroup namespaces; caps; seccomp;
                                      lxcfs's files over /proc (the sandbox's own limits)
  /usr/lib/coppice/init               PID 1 (--as-pid-1): sshd + the agent, reaps orphans
"""

from __future__ import annotations

import errno
import functools
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from coppice.config import Limits, NetworkSettings, Settings
from coppice.errors import (
    HostResourceExhausted,
    NotSupportedOnSubstrate,
    PrerequisiteMissing,
    SandboxDied,
    SubstrateError,
)
from coppice.host import fs_sync, mounts
from coppice.host.processes import ProcessIdentity
from coppice.host.sparse_files import copy_sparse
from coppice.images.keys import generate_ed25519
from coppice.net.egress_table import SandboxEgress
from coppice.net.sandbox_link import SandboxLink
from coppice.resource_usage import ResourceUsage
from coppice.substrates import cgroups, readiness, seccomp
from coppice.substrates.base import (
    AGENT_PORT,
    SSH_PORT,
    Handle,
    HeadProcess,
    HostObjects,
    Persistence,
    SnapshotArtifact,
    SpawnSpec,
)
from coppice.substrates.children import Children
from coppice.substrates.entry_disk import EntryDisks
from coppice.substrates.jail_zygote import (
    ZYGOTE_CAPABILITIES,
    ZYGOTE_LAUNCHER,
    ZYGOTE_SCRIPT,
    TemplateVersion,
    TemplateZygotes,
    Zygote,
    open_descriptors,
)
from coppice.substrates.lxcfs import PROC_FILES, LxcfsDaemon, proc_binds
from coppice.substrates.prerequisites import require_root, require_tools
from coppice.substrates.teardown import Teardown, rmtree_if_exists

INIT_PATH = "/usr/lib/coppice/init"
#: where a zygote's root is mounted while it starts (one directory per start)
ZYGOTE_ROOT_PREFIX = "zygote-root-"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REQUIRED_TOOLS = {
    "bwrap": "bubblewrap",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "newuidmap": "uidmap",
    "newgidmap": "uidmap",
    "mkfs.ext4": "e2fsprogs",
    "setsid": "util-linux",
    "lxcfs": "lxcfs",
}
MIB = 1024 * 1024
#: /run holds pid files, locks and sockets (sshd, the sudo broker): kilobytes. Bounded, like
#: every tmpfs of a jail, because without swap its pages cannot be reclaimed: a full one
#: holds memory of the sandbox's cgroup until the jail ends (unbounded, tmpfs would allow
#: half the host's RAM).
RUN_TMPFS_MB = 32
# What sshd and ordinary root work inside a jail need. Everything else (CAP_SYS_ADMIN,
# CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE, ...) is dropped. They are capabilities of the
# jail's own user namespace, never of the host.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_AUDIT_WRITE",
)
# Runs in the entry's network namespace as host root, before any namespace of the jail's own:
# ports below 1024 open to the jail's root (whose capabilities do not reach this namespace),
# the OOM killer is told to spare the jail's own processes (below), then it joins the cgroups
# named in its arguments up to "--" and execs the rest.
#
# The OOM killer and the jail: the launcher sets oom_score_adj -1000 (never picked) and
# everything the jail runs inherits it: init, sshd, the agent and its kernel manager. The
# agent starts every user process at +1000 (coppice_agent/oom.py), sshd every session, so at
# the sandbox's memory limit the kernel kills a user process and the agent reports it.
#
# The kernel's rule: a write to oom_score_adj by a process with CAP_SYS_RESOURCE (in the
# host's user namespace, which no jail has) also sets its oom_score_adj_min; forks inherit
# both; without that capability a process may set any value down to its min. So a user
# process may lower itself back to -1000. All it gains is being spared too: with nothing left
# to kill, its sandbox stalls at its own cgroup's memory limit, while the host and every
# other sandbox are untouched, and killing the sandbox (timeout, kill) still ends it.
#
# Where even host root lacks CAP_SYS_RESOURCE (a container host, a restricted CI runner) the
# write fails and the chain stays at 0 with min 0: user processes at +1000 still always
# outrank it, they can lower themselves to 0 at most, and the agent can die only of memory
# it uses itself.
LAUNCHER = (
    "echo 0 > /proc/sys/net/ipv4/ip_unprivileged_port_start; "
    "echo -1000 2>/dev/null > /proc/self/oom_score_adj; "
    'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'
)


#: a jail snapshot's one file: the entry's disk image, sparse
SNAPSHOT_IMAGE = "disk.img"


class JailSubstrate:
    name = "jail"
    #: memory only as a cgroup freeze, which a host reboot ends (CRIU cannot restore on
    #: this host's kernel); snapshots keep files only
    persistence = Persistence(memory_in_snapshots=False, memory_pause_survives_reboot=False)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.link = SandboxLink(settings.jail_network, settings.namespace)
        self.egress = SandboxEgress(settings, settings.jail_network)
        self._cgroups: cgroups.CgroupDriver | None = None
        self._children = Children()
        self._filter_path: Path | None = None
        self._zygote_filter_path: Path | None = None
        self.disks = EntryDisks(settings.entry_disks_dir)
        self.lxcfs = LxcfsDaemon(settings.run_dir)
        self.zygotes = TemplateZygotes(self._start_zygote)

    @property
    def network(self) -> NetworkSettings:
        return self.settings.jail_network

    @property
    def spawn_parallelism(self) -> int:
        return self.settings.spawn_parallelism

    @property
    def cgroups(self) -> cgroups.CgroupDriver:
        if self._cgroups is None:
            self._cgroups = cgroups.detect(self.settings.namespace)
        return self._cgroups

    def entry_dir(self, entry_id: str) -> Path:
        return self.settings.entries_dir / entry_id

    # -- host --------------------------------------------------------------------------------

    def check_prerequisites(self) -> None:
        require_root(self.name)
        require_tools(REQUIRED_TOOLS)
        if not Path("/dev/loop-control").exists():
            raise PrerequisiteMissing(
                "no /dev/loop-control: entry disks need loop devices; `modprobe loop`"
            )
        max_ns = Path("/proc/sys/user/max_user_namespaces")
        if max_ns.exists() and max_ns.read_text().strip() == "0":
            raise PrerequisiteMissing(
                "user namespaces are disabled; `sysctl -w user.max_user_namespaces=15000`"
            )
        if not Path("/dev/fuse").exists():
            raise PrerequisiteMissing("lxcfs needs /dev/fuse; load the module: `modprobe fuse`")
        self.cgroups  # noqa: B018 - detection raises PrerequisiteMissing on an unusable host

    def prepare_host(self) -> None:
        self.check_prerequisites()
        ensure_subordinate_ids(self.settings)
        self.link.bridge.ensure()
        self.egress.ensure()
        self.cgroups.prepare()
        self.settings.entries_dir.mkdir(parents=True, exist_ok=True)
        self.disks.prepare()
        self._seccomp_filter()
        self.lxcfs.ensure()

    def _seccomp_filter(self) -> Path:
        """The compiled filter, compiled once per process rather than once per spawn."""
        if self._filter_path is None or not self._filter_path.exists():
            self._filter_path = seccomp.ensure_filter_file(self.settings.run_dir)
        return self._filter_path

    def _zygote_seccomp_filter(self) -> Path:
        if self._zygote_filter_path is None or not self._zygote_filter_path.exists():
            self._zygote_filter_path = seccomp.ensure_filter_file(
                self.settings.run_dir, zygote=True
            )
        return self._zygote_filter_path

    def _start_zygote(self, version: TemplateVersion) -> Zygote:
        """A template's rootfs is a stack of layers: the zygote gets them as one read-only
        overlay, mounted here only while bwrap copies it into the zygote's own mount
        namespace (then detached: nothing of it stays in the host's)."""
        # A directory of this start's own: a CLI and a gateway (or two warms) may start a
        # zygote of the same template at once.
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        root = Path(
            tempfile.mkdtemp(
                prefix=f"{ZYGOTE_ROOT_PREFIX}{version.name}-", dir=self.settings.run_dir
            )
        )
        mounted = False
        try:
            mounts.mount("overlay", root, "overlay", mounts.MS_RDONLY, f"lowerdir={version.rootfs}")
            mounted = True
            return Zygote.start(
                version,
                lambda control_fd, filter_fd: zygote_argv(
                    self.settings, root, control_fd, filter_fd
                ),
                self._zygote_seccomp_filter(),
                self.settings.run_dir / f"zygote-{version.name}.log",
            )
        except OSError as exc:
            raise SubstrateError(f"cannot start the zygote of {version.name}: {exc}") from exc
        finally:
            if mounted:
                mounts.unmount(root)
            root.rmdir()

    def teardown_host(self) -> None:
        self.zygotes.stop_all()
        # A process that died while starting a zygote left its root mounted.
        for path in sorted(self.settings.run_dir.glob(f"{ZYGOTE_ROOT_PREFIX}*")):
            if os.path.ismount(path):
                mounts.unmount(path)
            path.rmdir()
        for path in sorted(self.settings.run_dir.glob("zygote-*.log")):
            path.unlink()
        self.egress.remove()
        self.lxcfs.stop()
        self.link.bridge.remove()
        self.cgroups.remove_parent()
        for path in sorted(self.settings.run_dir.glob("seccomp-*.bpf")):
            path.unlink()
        self._filter_path = None
        self.disks.remove_empty_images()
        # Build steps mount their images under run_dir/build-mnt; empty once they end.
        build_mounts = self.settings.run_dir / "build-mnt"
        for d in (self.settings.entries_dir, build_mounts, self.settings.run_dir):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()

    # -- one entry ----------------------------------------------------------------------------

    def spawn(self, spec: SpawnSpec) -> Handle:
        return self._spawn(
            spec, lambda entry_dir: self.disks.create(spec.entry_id, spec.limits.disk_mb, entry_dir)
        )

    def _spawn(self, spec: SpawnSpec, make_disk: Callable[[Path], None]) -> Handle:
        """Start the entry on the disk `make_disk` mounts at its directory: a fresh one, a
        snapshot's copy, or the one a files-only pause kept (upper and work already there)."""
        base = self.settings.jail_uid_base
        entry_dir = self.entry_dir(spec.entry_id)
        merged = entry_dir / "merged"
        entry_dir.mkdir(parents=True, exist_ok=False)
        make_disk(entry_dir)
        try:
            for sub in ("upper", "work", "merged"):
                (entry_dir / sub).mkdir(exist_ok=True)
            os.chown(entry_dir / "upper", base, base)
            lower = spec.template.rootfs
            mounts.mount(
                "overlay",
                merged,
                "overlay",
                0,
                f"lowerdir={lower},upperdir={entry_dir}/upper,workdir={entry_dir}/work",
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise HostResourceExhausted(
                    f"{exc}; the template's disk limit is too small for its first writes"
                ) from exc
            raise SubstrateError(str(exc)) from exc
        self._inject_identity(merged, spec)
        # Every spawn looks, so a daemon that died is back for the next sandbox (a few
        # reads: warm time, not checkout).
        self.lxcfs.ensure()
        self.cgroups.create(spec.entry_id, spec.limits)
        zygote = self._zygote(spec)
        if zygote is not None:
            return self._spawn_forked(spec, zygote, merged)
        self.link.create(spec.entry_id, spec.ip)

        filter_path = self._seccomp_filter()
        filter_fd = os.open(filter_path, os.O_RDONLY)
        try:
            argv = self._argv(spec, merged, filter_fd)
            with open(entry_dir / "console.log", "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(filter_fd,),
                    start_new_session=True,
                )
        finally:
            os.close(filter_fd)
        self._children.add(spec.entry_id, proc)
        ident = ProcessIdentity.of(proc.pid)
        return Handle(
            head=HeadProcess(proc.pid, ident.start_time) if ident else None,
            driver={
                "ip": spec.ip,
                "entry_dir": str(entry_dir),
                "cgroup_version": self.cgroups.version,
            },
        )

    def _zygote(self, spec: SpawnSpec) -> Zygote | None:
        if not self.settings.jail_zygote:
            return None
        t = spec.template
        return self.zygotes.get(TemplateVersion(t.name, t.rootfs, t.built_at))

    def _spawn_forked(self, spec: SpawnSpec, zygote: Zygote, merged: Path) -> Handle:
        """The entry as a fork of its template's zygote: the same jail, set up from inside
        by the fork (coppice_agent.zygote.child) instead of by bwrap."""
        entry_dir = self.entry_dir(spec.entry_id)
        try:
            descriptors = open_descriptors(
                merged,
                entry_dir / "console.log",
                self._seccomp_filter(),
                self.cgroups.join_files(spec.entry_id),
                {name: self.lxcfs.mountpoint / "proc" / name for name in PROC_FILES},
            )
        except OSError as exc:
            raise SubstrateError(f"cannot prepare entry {spec.entry_id}: {exc}") from exc
        pid = zygote.fork_entry(
            spec.entry_id,
            spec.hostname,
            shm_tmpfs_mb(spec.limits) * MIB,
            RUN_TMPFS_MB * MIB,
            CAPABILITIES,
            self.settings.jail_uid_count,
            descriptors,
            attach=lambda pid: self.link.attach(spec.entry_id, spec.ip, pid),
            timeout_s=self.settings.ready_timeout_s,
        )
        ident = ProcessIdentity.of(pid)
        return Handle(
            head=HeadProcess(pid, ident.start_time) if ident else None,
            driver={
                "ip": spec.ip,
                "entry_dir": str(entry_dir),
                "cgroup_version": self.cgroups.version,
                "zygote": zygote.pid,
            },
        )

    def _argv(self, spec: SpawnSpec, merged: Path, filter_fd: int) -> list[str]:
        s = self.settings
        return [
            "nsenter",
            f"--net={self.link.netns_path(spec.entry_id)}",
            "--",
            "sh",
            "-c",
            LAUNCHER,
            "sh",
            *(str(p) for p in self.cgroups.join_files(spec.entry_id)),
            "--",
            *isolation_argv(
                s,
                merged,
                spec.hostname,
                filter_fd,
                spec.limits,
                [
                    *proc_binds(self.lxcfs.mountpoint),
                    # Our init is PID 1 (no bwrap reaper in front of it), so the jail's
                    # /proc/1 shows it rather than bwrap's host command line.
                    "--as-pid-1",
                    "--setenv", "PATH", DEFAULT_PATH,
                    "--setenv", "HOME", "/root",
                    "--chdir", "/root",
                ],
            ),
            "--",
            INIT_PATH,
        ]  # fmt: skip

    def _inject_identity(self, root: Path, spec: SpawnSpec) -> None:
        """Per-entry identity goes into the entry's upper layer, never into the template."""
        uid = self.settings.jail_uid_base
        host_key = generate_ed25519(f"root@{spec.hostname}")
        files: list[tuple[str, bytes, int]] = [
            (
                "etc/coppice-instance",
                (
                    f"COPPICE_ENTRY_ID={spec.entry_id}\n"
                    f"COPPICE_IP={spec.ip}\n"
                    f"COPPICE_HOSTNAME={spec.hostname}\n"
                ).encode(),
                0o644,
            ),
            ("etc/hostname", f"{spec.hostname}\n".encode(), 0o644),
            ("etc/hosts", f"127.0.0.1 localhost\n{spec.ip} {spec.hostname}\n".encode(), 0o644),
            # the resolver the gateway runs on the bridge, which enforces domain rules
            ("etc/resolv.conf", f"nameserver {self.network.gateway}\n".encode(), 0o644),
            ("etc/ssh/ssh_host_ed25519_key", host_key.private_openssh, 0o600),
            ("etc/ssh/ssh_host_ed25519_key.pub", f"{host_key.public_openssh}\n".encode(), 0o644),
        ]
        try:
            for rel, data, mode in files:
                path = root / rel
                path.unlink(missing_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                try:
                    os.write(fd, data)
                    os.fchown(fd, uid, uid)
                finally:
                    os.close(fd)
        except OSError as exc:
            if exc.errno == 28:
                raise HostResourceExhausted(f"no space for entry {spec.entry_id}: {exc}") from exc
            raise SubstrateError(f"cannot write identity of {spec.entry_id}: {exc}") from exc

    def wait_ready(self, spec: SpawnSpec, handle: Handle, timeout_s: float) -> None:
        readiness.wait_until_answering(
            spec.entry_id,
            spec.ip,
            AGENT_PORT,
            SSH_PORT,
            timeout_s,
            is_alive=lambda: self.is_alive(spec.entry_id, handle),
            diagnostics=lambda: self.console_tail(spec.entry_id),
        )
        # Up on all the host's CPUs (a burst of warms is spread by the scheduler), held to
        # its own from here on, before any user code runs: what nproc shows.
        self.cgroups.place_cpus(spec.entry_id, spec.limits.cpus)

    def usage(self, entry_id: str, handle: Handle | None) -> ResourceUsage | None:
        entry_dir = self.entry_dir(entry_id)
        try:
            cg = self.cgroups.usage(entry_id)
            if not os.path.ismount(entry_dir):
                return None  # not its own disk (yet, or any more): no made-up figures
            disk = os.statvfs(entry_dir)  # the entry's own disk
        except (OSError, ValueError):
            return None  # gone meanwhile
        return ResourceUsage(
            cpu_seconds=cg.cpu_seconds,
            mem_used=cg.mem_used,
            mem_cache=cg.mem_cache,
            mem_total=cg.mem_limit,
            disk_used=(disk.f_blocks - disk.f_bfree) * disk.f_frsize,
            disk_total=disk.f_blocks * disk.f_frsize,
        )

    def console_log(self, entry_id: str) -> Path:
        return self.entry_dir(entry_id) / "console.log"

    def console_tail(self, entry_id: str, lines: int = 5) -> str:
        try:
            text = (self.entry_dir(entry_id) / "console.log").read_text(errors="replace")
        except OSError:
            return "no console output"
        tail = " | ".join(text.strip().splitlines()[-lines:])
        return f"console: {tail}" if tail else "console is empty"

    def pause(self, entry_id: str, handle: Handle | None) -> None:
        self.cgroups.freeze(entry_id)

    def suspend(self, entry_id: str, handle: Handle | None) -> Handle:
        # A freeze: CRIU cannot restore processes on this kernel, so a jail's memory is kept
        # only while the host runs (persistence says so, and so does the pause's answer).
        self.pause(entry_id, handle)
        assert handle is not None
        return handle

    def wake(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        self.resume(spec.entry_id, handle)
        assert handle is not None
        return handle

    def resume(self, entry_id: str, handle: Handle | None) -> None:
        # Every resume is of a sandbox someone uses: its full CPU share from here on.
        self.cgroups.set_serving(entry_id)
        self.cgroups.thaw(entry_id)

    def is_alive(self, entry_id: str, handle: Handle | None) -> bool:
        return self._children.head_alive(entry_id, handle)

    def agent_address(self, handle: Handle) -> tuple[str, int]:
        return str(handle.driver["ip"]), AGENT_PORT

    def forget_template(self, template_name: str) -> None:
        pass  # a jail keeps nothing per template beyond its rootfs, which the builder owns

    def destroy(self, entry_id: str, handle: Handle | None) -> None:
        self._teardown(entry_id, keep_disk=False)

    def _teardown(self, entry_id: str, keep_disk: bool) -> None:
        teardown = Teardown(entry_id)
        teardown.attempt("kill", lambda: self.cgroups.kill_all(entry_id))
        child = self._children.pop(entry_id)
        if child is not None:
            teardown.attempt("reap", lambda: child.wait(timeout=5))
        entry_dir = self.entry_dir(entry_id)
        for point in mounts.mounts_under(entry_dir):
            teardown.attempt(f"unmount {point}", functools.partial(mounts.unmount, point))
        if keep_disk:
            teardown.attempt("detach disk", lambda: self.disks.detach(entry_id))
        else:
            teardown.attempt("remove disk", lambda: self.disks.release(entry_id))
        if not (keep_disk and os.path.ismount(entry_dir)):  # never the kept files
            teardown.attempt("remove directory", lambda: rmtree_if_exists(entry_dir))
        teardown.attempt("remove network", lambda: self.link.remove(entry_id))
        teardown.attempt("remove cgroups", lambda: self.cgroups.remove(entry_id))
        teardown.finish()

    # -- snapshots and files-only pauses ------------------------------------------------------

    def footprint(self, entry_id: str, handle: Handle | None, keep_memory: bool) -> int:
        if keep_memory:
            raise NotSupportedOnSubstrate(
                "a snapshot with memory", self.name, "snapshots of its files (memory=false)"
            )
        return self.disks.allocated_bytes(entry_id)

    def snapshot(
        self, entry_id: str, handle: Handle | None, directory: Path, keep_memory: bool
    ) -> SnapshotArtifact:
        """The entry's disk image, copied (sparse) while its processes are frozen, once
        syncfs has written out what they wrote. Nothing else writes to that filesystem (it
        has no journal and no lazy inode-table init, see entry_disk_plan), so the copy is
        the filesystem as it stands: e2fsck finds it clean. A freeze (FIFREEZE) promised
        the same at three times the cost, three RCU grace periods for its write locks
        (bench/jail_capture_bench.py measures both)."""
        if keep_memory:
            raise NotSupportedOnSubstrate(
                "a snapshot with memory", self.name, "snapshots of its files (memory=false)"
            )
        if not self.is_alive(entry_id, handle):
            raise SandboxDied(entry_id)
        was_frozen = self.cgroups.is_frozen(entry_id)
        target = directory / SNAPSHOT_IMAGE
        try:
            if not was_frozen:
                self.cgroups.freeze(entry_id)
            fs_sync.syncfs(self.entry_dir(entry_id))
            copy_sparse(self.disks.image(entry_id), target)
        except OSError as exc:
            raise SubstrateError(f"cannot snapshot the disk of {entry_id}: {exc}") from exc
        finally:
            if not was_frozen:
                self.cgroups.thaw(entry_id)
        return SnapshotArtifact(
            directory, False, target.stat().st_blocks * 512, {"image": SNAPSHOT_IMAGE}
        )

    def spawn_from_snapshot(self, spec: SpawnSpec, artifact: SnapshotArtifact) -> Handle:
        image = artifact.directory / str(artifact.driver.get("image", SNAPSHOT_IMAGE))
        return self._spawn(
            spec, lambda entry_dir: self.disks.create_from(spec.entry_id, image, entry_dir)
        )

    def stop_processes(self, entry_id: str, handle: Handle | None) -> None:
        """Everything of the entry goes but its disk image (in state_dir, so it outlives a
        reboot); `start_processes` mounts it again."""
        self._teardown(entry_id, keep_disk=True)

    def start_processes(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        if not self.disks.image(spec.entry_id).exists():
            raise SandboxDied(spec.entry_id)
        return self._spawn(spec, lambda entry_dir: self.disks.mount_kept(spec.entry_id, entry_dir))

    def has_files(self, entry_id: str, handle: Handle | None) -> bool:
        return self.disks.image(entry_id).exists()

    def end_capture(self, entry_id: str, handle: Handle | None) -> None:
        self.resume(entry_id, handle)  # a capture holds nothing but the freeze

    def delete_snapshot(self, directory: Path) -> None:
        rmtree_if_exists(directory)

    def host_objects(self) -> HostObjects:
        entries_dir = self.settings.entries_dir
        dirs = {p.name for p in entries_dir.iterdir()} if entries_dir.is_dir() else set()
        mounted = {
            p.relative_to(entries_dir).parts[0]
            for p in mounts.mounts_under(entries_dir)
            if p != entries_dir
        }
        return HostObjects(
            {
                "cgroups": self.cgroups.names(),
                "network": self.link.entry_ids(),
                "directories": dirs,
                "mounts": mounted,
                **self.disks.owners(),
            }
        )


def shm_tmpfs_mb(limits: Limits) -> int:
    """/dev/shm gets a quarter of the sandbox's memory: room for POSIX shared memory
    (multiprocessing, DataLoader workers: twice Docker's 64 MiB at the default 512 MiB),
    while a full one still leaves three quarters for the processes, the agent among them."""
    return max(1, limits.memory_mb // 4)


def tmpfs_argv(limits: Limits) -> list[str]:
    """bwrap options for the jail's memory-backed mounts, every one bounded. /dev (bwrap's
    --dev, a tmpfs holding the device nodes, which --size cannot bound) is made read-only
    once /dev/shm is mounted below it: nothing needs to write files there."""
    return [
        "--dev", "/dev",
        # 1777 as on any Linux: `user` makes semaphores and shared memory there too.
        "--perms", "1777", "--size", str(shm_tmpfs_mb(limits) * MIB), "--tmpfs", "/dev/shm",
        "--size", str(RUN_TMPFS_MB * MIB), "--tmpfs", "/run",
        "--remount-ro", "/dev",
    ]  # fmt: skip


def isolation_argv(
    settings: Settings,
    root: Path,
    hostname: str,
    seccomp_fd: int,
    limits: Limits,
    extra: Sequence[str],
) -> list[str]:
    """What a jail is, as a command prefix: a user namespace mapping root to the jail id
    range (unshare + newuidmap), then bwrap over `root` with its own mount, pid, ipc, uts
    and cgroup namespaces, bounded tmpfs mounts sized from `limits`, the jail's
    capabilities, its seccomp filter (an inherited fd) and an empty environment. `extra`:
    more bwrap options (binds, env, cwd) before the command, which follows after "--".
    Build steps run in the same jail as sandboxes do."""
    ids = f"{settings.jail_uid_base},0,{settings.jail_uid_count}"
    caps: list[str] = []
    for cap in CAPABILITIES:
        caps += ["--cap-add", cap]
    return [
        "unshare", "--user", f"--map-users={ids}", f"--map-groups={ids}",
        "--setuid", "0", "--setgid", "0", "--",
        "bwrap",
        "--bind", str(root), "/",
        "--proc", "/proc",
        *tmpfs_argv(limits),
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", hostname,
        "--new-session",
        "--cap-drop", "ALL", *caps,
        "--seccomp", str(seccomp_fd),
        "--clearenv",
        *extra,
    ]  # fmt: skip


def zygote_argv(settings: Settings, rootfs: Path, control_fd: int, seccomp_fd: int) -> list[str]:
    """A template's zygote (see jail_zygote): confined as a jail, over the template's own
    rootfs read-only, with no network and only the capabilities it needs."""
    ids = f"{settings.jail_uid_base},0,{settings.jail_uid_count}"
    caps: list[str] = []
    for cap in ZYGOTE_CAPABILITIES:
        caps += ["--cap-add", cap]
    return [
        "sh", "-c", ZYGOTE_LAUNCHER, "sh",
        "unshare", "--user", f"--map-users={ids}", f"--map-groups={ids}",
        "--setuid", "0", "--setgid", "0", "--",
        "bwrap",
        "--ro-bind", str(rootfs), "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
        "--unshare-cgroup-try",
        "--hostname", "zygote",
        # PID 1 of its pid namespace: the entries' PID 1s are re-parented to it
        "--as-pid-1",
        "--new-session",
        "--cap-drop", "ALL", *caps,
        "--seccomp", str(seccomp_fd),
        "--clearenv",
        "--setenv", "PATH", DEFAULT_PATH,
        "--chdir", "/",
        "--", "python3", "-I", "-S", ZYGOTE_SCRIPT, str(control_fd),
    ]  # fmt: skip


def ensure_subordinate_ids(settings: Settings) -> None:
    """newuidmap only maps ranges /etc/subuid grants; grant root the jails' range once."""
    lo = settings.jail_uid_base
    hi = lo + settings.jail_uid_count - 1
    if _grants_range(Path("/etc/subuid"), lo, hi) and _grants_range(Path("/etc/subgid"), lo, hi):
        return
    done = subprocess.run(
        ["usermod", "--add-subuids", f"{lo}-{hi}", "--add-subgids", f"{lo}-{hi}", "root"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise PrerequisiteMissing(
            f"cannot grant root the id range {lo}-{hi} in /etc/subuid and /etc/subgid: "
            f"{done.stderr.strip()}"
        )


def _grants_range(path: Path, lo: int, hi: int) -> bool:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in ("root", "0"):
            start, count = int(parts[1]), int(parts[2])
            if start <= lo and hi < start + count:
                return True
    return False
