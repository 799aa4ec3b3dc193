"""Builds templates: a debootstrapped Debian root, customised, then either owned by the jail
id range (substrate `jail`) or turned into a kernel, initramfs and ext4 disk (substrate `vm`).

Two caches make rebuilds cheap:
  * the template itself is addressed by the hash of everything that goes into it (recipe,
    guest files, pool public key, id base, builder version): an unchanged recipe is a no-op;
  * the debootstrapped base is addressed by (suite, packages) alone, so changing the agent
    or the key re-customises a copy of the base in seconds instead of bootstrapping again.
Downloaded .deb files and unpacked guest kernels live in a host-level cache shared by every
state directory.
"""

from __future__ import annotations

import compileall
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from coppice.config import Settings
from coppice.errors import Conflict, PrerequisiteMissing, TemplateBuildError
from coppice.images.disk_image import tree_usage
from coppice.images.file_lock import locked
from coppice.images.idshift import shift_ownership
from coppice.images.kernel import cached_kernel, current_kernel_release, require_apt_tools
from coppice.images.keys import PoolKey
from coppice.images.mirror import debian_mirror
from coppice.images.recipes import Recipe, recipe
from coppice.images.vm_image import (
    INITRAMFS_MODULES,
    ROOT_DISK,
    VM_IMAGE_VERSION,
    build_vm_image,
    static_busybox,
)
from coppice.progress import Progress, SilentProgress
from coppice.store.records import TemplatePolicy, TemplateRecord
from coppice.store.store import Store

BUILDER_VERSION = "2"
#: where the agent and its locked dependencies live inside a template; only the agent's own
#: interpreter puts it on sys.path, so sandboxed code never imports from it by accident
AGENT_SITE = "usr/lib/coppice/site"
#: tools a vm template build runs, besides apt's (the QEMU ones are checked so that a
#: template is never built on a host that cannot boot it)
VM_TOOLS = ("qemu-system-x86_64", "qemu-img", "mkfs.ext4")


@dataclass(frozen=True)
class GuestFile:
    """A file of the `coppice.guest` package that goes into templates of some substrates."""

    #: where it goes in the root filesystem; None: the builder uses it to make something else
    dest: str | None
    mode: int
    substrates: tuple[str, ...]


GUEST_FILES = {
    "init.sh": GuestFile("usr/lib/coppice/init", 0o755, ("jail",)),
    "agent.py": GuestFile("usr/lib/coppice/agent.py", 0o644, ("jail", "vm")),
    "vm-init.sh": GuestFile("usr/lib/coppice/vm-init", 0o755, ("vm",)),
    "initramfs-init.sh": GuestFile(None, 0o755, ("vm",)),
}
SSHD_CONFIG = """\
# Written by the Coppice template builder.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# PAM wants audit and loginuid, which a user namespace does not grant; keys need no PAM.
UsePAM no
UseDNS no
PrintMotd no
"""


def _guest_file(name: str) -> bytes:
    return resources.files("coppice.guest").joinpath(name).read_bytes()


def _agent_files() -> list[tuple[str, bytes]]:
    """The agent package as (relative path, bytes), sorted: what a template ships of it."""
    root = resources.files("coppice_agent")
    found: list[tuple[str, bytes]] = []

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                if child.name != "__pycache__":
                    walk(child, rel + "/")
            elif child.name.endswith((".py", ".lock", ".proto")):
                found.append((rel, child.read_bytes()))

    walk(root, "")
    return sorted(found)


def guest_files(substrate: str) -> list[str]:
    return sorted(name for name, f in GUEST_FILES.items() if substrate in f.substrates)


def policy_of(r: Recipe) -> TemplatePolicy:
    """What the template's sandboxes run with, as the recipe says at build time."""
    return TemplatePolicy(limits=r.limits, aliases=r.aliases, cold_start=r.cold_start)


def recipe_hash(
    r: Recipe,
    pool_public_key: str,
    uid_base: int,
    sshd_config: str,
    vm_inputs: dict[str, object] | None = None,
) -> str:
    """`vm_inputs`: what else goes into a vm template (kernel, initramfs contents)."""
    inputs: dict[str, object] = {
        "builder": BUILDER_VERSION,
        "name": r.name,
        "substrate": r.substrate,
        "suite": r.suite,
        "packages": list(r.packages),
        "key": pool_public_key,
        "uid_base": uid_base,
        "sshd": sshd_config,
    }
    if vm_inputs is not None:
        inputs["vm"] = vm_inputs
    h = hashlib.sha256()
    h.update(json.dumps(inputs, sort_keys=True).encode())
    for name in guest_files(r.substrate):
        h.update(name.encode() + b"\0" + _guest_file(name))
    for rel, data in _agent_files():
        h.update(rel.encode() + b"\0" + data)
    return h.hexdigest()


def base_hash(r: Recipe) -> str:
    key = json.dumps(
        {"builder": BUILDER_VERSION, "suite": r.suite, "packages": list(r.packages)}, sort_keys=True
    )
    return hashlib.sha256(key.encode()).hexdigest()


def _vm_inputs(kernel_release: str) -> dict[str, object]:
    """What a vm template is made of besides the root filesystem. The kernel release is
    part of it, so a new Debian kernel (after `apt-get update`) makes a new template."""
    return {
        "image": VM_IMAGE_VERSION,
        "kernel": kernel_release,
        "modules": list(INITRAMFS_MODULES),
        "busybox": hashlib.sha256(static_busybox()).hexdigest(),
    }


def _is_built(final: Path, substrate: str) -> bool:
    if substrate == "vm":
        return (final / "vm" / ROOT_DISK).is_file()
    return (final / "rootfs").is_dir()


def _openssh_version(rootfs: Path) -> tuple[int, int]:
    done = subprocess.run(
        ["chroot", str(rootfs), "ssh", "-V"], capture_output=True, text=True, check=False
    )
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", done.stderr + done.stdout)
    if not m:
        raise TemplateBuildError(f"cannot tell the OpenSSH version in {rootfs}: {done.stderr}")
    return int(m.group(1)), int(m.group(2))


class TemplateBuilder:
    def __init__(self, settings: Settings, store: Store, progress: Progress | None = None):
        self.settings = settings
        self.store = store
        self.progress = progress or SilentProgress()

    def build(self, name: str, force: bool = False) -> tuple[TemplateRecord, bool]:
        """Build (or find cached) template `name`; returns it and whether it was built now."""
        r = recipe(name)
        self._check_prerequisites(r)
        key = PoolKey.at(self.settings.keys_dir).ensure()
        kernel_release = current_kernel_release() if r.substrate == "vm" else None
        vm_inputs = _vm_inputs(kernel_release) if kernel_release is not None else None
        digest = recipe_hash(
            r, key.public_openssh, self.settings.jail_uid_base, SSHD_CONFIG, vm_inputs
        )
        final = self.settings.templates_dir / name / digest
        with locked(self.settings.templates_dir / f".{name}.lock"):
            if not force and _is_built(final, r.substrate):
                try:
                    existing = self.store.get_template(name)
                except Exception:
                    existing = None
                if existing is not None and existing.recipe_hash == digest:
                    if existing.policy != policy_of(r):
                        # Built before policies were stored (or the recipe's changed).
                        existing = dataclasses.replace(existing, policy=policy_of(r))
                        self.store.put_template(existing)
                    return existing, False
            started = time.monotonic()
            base = self._base_rootfs(r)
            work = final.with_name(f"{digest}.tmp-{os.getpid()}")
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            try:
                self.progress.stage("copying the base root filesystem")
                subprocess.run(
                    ["cp", "-a", "--reflink=auto", str(base), str(work / "rootfs")],
                    check=True,
                    capture_output=True,
                )
                self.progress.stage("customising (sshd, pool key, agent, user)")
                self._customise(work / "rootfs", r, key, digest)
                if kernel_release is not None:
                    artefacts = self._make_vm_image(work, kernel_release)
                else:
                    self.progress.stage(
                        f"shifting owners into the jail id range (+{self.settings.jail_uid_base})"
                    )
                    shift_ownership(work / "rootfs", self.settings.jail_uid_base)
                    artefacts = work / "rootfs"
                size = tree_usage(artefacts).bytes
                if final.exists():
                    shutil.rmtree(final)
                work.rename(final)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            record = TemplateRecord(
                name=name,
                substrate=r.substrate,
                recipe_hash=digest,
                rootfs=str(final / artefacts.name),
                built_at=time.time(),
                build_seconds=time.monotonic() - started,
                size_bytes=size,
                policy=policy_of(r),
            )
            self.store.put_template(record)
            self._prune_old_versions(name, keep=digest)
            return record, True

    def remove(self, name: str) -> None:
        record = self.store.get_template(name)
        live = self.store.list_entries(record.name)
        if live:
            raise Conflict(
                f"template {name} still has {len(live)} pool entries; "
                f"run `coppice pool drain {name}` first"
            )
        with locked(self.settings.templates_dir / f".{name}.lock"):
            self.store.delete_template(name)
            shutil.rmtree(self.settings.templates_dir / name, ignore_errors=True)
            (self.settings.templates_dir / f".{name}.lock").unlink(missing_ok=True)

    def _prune_old_versions(self, name: str, keep: str) -> None:
        # Running entries keep their overlay's lower directory busy; only prune when idle.
        if self.store.list_entries(name):
            return
        for old in (self.settings.templates_dir / name).iterdir():
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def _check_prerequisites(self, r: Recipe) -> None:
        if os.geteuid() != 0:
            raise PrerequisiteMissing("building templates needs root (debootstrap, chroot)")
        if shutil.which("debootstrap") is None:
            raise PrerequisiteMissing("debootstrap is not installed; run scripts/setup")
        if r.substrate == "vm":
            for tool in VM_TOOLS:
                if shutil.which(tool) is None:
                    raise PrerequisiteMissing(
                        f"{tool} is not installed (vm templates need QEMU and e2fsprogs); "
                        "run scripts/setup"
                    )
            static_busybox()
            require_apt_tools()

    def _make_vm_image(self, work: Path, kernel_release: str) -> Path:
        """Kernel, initramfs and ext4 disk in `work/vm`; the root tree is only their source."""
        kernel = cached_kernel(self.settings.cache_dir / "kernels", kernel_release, self.progress)
        out = work / "vm"
        build_vm_image(
            work / "rootfs", out, kernel, _guest_file("initramfs-init.sh"), self.progress
        )
        shutil.rmtree(work / "rootfs")
        return out

    def _base_rootfs(self, r: Recipe) -> Path:
        digest = base_hash(r)
        cache = self.settings.build_cache_dir / f"base-{digest}"
        with locked(self.settings.build_cache_dir / f".base-{digest}.lock"):
            if (cache / "rootfs").is_dir():
                self.progress.note(f"base root filesystem cached ({cache.name[:17]})")
                return cache / "rootfs"
            mirror = self.settings.debian_mirror or debian_mirror(r.suite)
            work = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                self._debootstrap(r, mirror, work / "rootfs")
                work.rename(cache)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        return cache / "rootfs"

    def _debootstrap(self, r: Recipe, mirror: str, target: Path) -> None:
        self.settings.deb_cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--cache-dir={self.settings.deb_cache_dir}",
            f"--include={','.join(r.packages)}",
            r.suite,
            str(target),
            mirror,
        ]
        self.progress.stage(f"debootstrap {r.suite} + {len(r.packages)} packages")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-19:], line]
            if line.startswith("I: "):
                self.progress.advance(line[3:])
        if proc.wait() != 0:
            log = target.parent / "debootstrap.log"
            hint = ""
            if any("No space left" in t for t in tail):
                hint = "; the disk is full: free space under " + str(self.settings.state_dir)
            raise TemplateBuildError(
                f"debootstrap failed (exit {proc.returncode}) using mirror {mirror}{hint}. "
                f"Last lines: {' | '.join(tail[-5:])}; see {log} if it exists"
            )

    def _install_agent(self, site: Path) -> None:
        """The agent package plus its hash-locked wheels. Templates run the host's Python
        minor version on the same libc (Debian 12), so the host's pip picks matching wheels."""
        self.progress.stage("installing the in-sandbox agent and its Python packages")
        shutil.rmtree(site, ignore_errors=True)
        site.mkdir(parents=True)
        lock = site.parent / "agent-requirements.lock"
        lock.write_bytes(
            resources.files("coppice_agent").joinpath("requirements.lock").read_bytes()
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--require-hashes",
                "--only-binary=:all:",
                "--target",
                str(site),
                "-r",
                str(lock),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-4:])
            hint = ""
            if "No space left" in done.stderr:
                hint = f"; the disk is full: free space under {self.settings.state_dir}"
            raise TemplateBuildError(
                f"installing the agent's packages failed{hint}: {tail}. The package index "
                "comes from pip's own configuration (pip config list)"
            )
        for rel, data in _agent_files():
            dest = site / "coppice_agent" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        # Byte-compile now: a sandbox would otherwise compile the agent at every start and
        # keep the .pyc files in its own writable layer.
        compileall.compile_dir(str(site / "coppice_agent"), quiet=1, workers=1)

    def _customise(self, root: Path, r: Recipe, key: PoolKey, digest: str) -> None:
        for old in (root / "etc/ssh").glob("ssh_host_*"):
            old.unlink()  # each entry gets its own host key at warm
        sshd = SSHD_CONFIG
        if _openssh_version(root) >= (9, 8):
            # 9.8+ penalises sources that connect and leave without authenticating, which
            # is exactly what the pool's readiness probe does.
            sshd += "PerSourcePenalties no\n"
        (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/ssh/sshd_config.d/coppice.conf").write_text(sshd)
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(key.public_openssh + "\n")
        (ssh_dir / "authorized_keys").chmod(0o600)
        for src in guest_files(r.substrate):
            guest = GUEST_FILES[src]
            if guest.dest is None:
                continue
            path = root / guest.dest
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_guest_file(src))
            path.chmod(guest.mode)
        self._install_agent(root / AGENT_SITE)
        if not (root / "home/user").exists():
            subprocess.run(
                [
                    "chroot",
                    str(root),
                    "useradd",
                    "--create-home",
                    "--uid",
                    "1000",
                    "--shell",
                    "/bin/bash",
                    "user",
                ],
                check=True,
                capture_output=True,
            )
        (root / "etc/coppice-template").write_text(
            f"COPPICE_TEMPLATE={r.name}\nCOPPICE_RECIPE={digest}\n"
        )
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / junk).glob("*"):
                if path.is_file():
                    path.unlink()
