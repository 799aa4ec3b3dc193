"""Builds templates: a debootstrapped Debian root, customised, owned by the jail id range.

Two caches make rebuilds cheap:
  * the template itself is addressed by the hash of everything that goes into it (recipe,
    guest files, pool public key, id base, builder version): an unchanged recipe is a no-op;
  * the debootstrapped base is addressed by (suite, packages) alone, so changing the agent
    or the key re-customises a copy of the base in seconds instead of bootstrapping again.
Downloaded .deb files live in a host-level cache shared by every state directory.
"""

from __future__ import annotations

import compileall
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from coppice.config import Settings
from coppice.errors import Conflict, PrerequisiteMissing, TemplateBuildError
from coppice.images.idshift import shift_ownership
from coppice.images.keys import PoolKey
from coppice.images.mirror import debian_mirror
from coppice.images.recipes import Recipe, recipe
from coppice.progress import Progress, SilentProgress
from coppice.store.records import TemplateRecord
from coppice.store.store import Store

BUILDER_VERSION = "2"
#: where the agent and its locked dependencies live inside a template; only the agent's own
#: interpreter puts it on sys.path, so sandboxed code never imports from it by accident
AGENT_SITE = "usr/lib/coppice/site"
GUEST_FILES = {
    "init.sh": ("usr/lib/coppice/init", 0o755),
    "agent.py": ("usr/lib/coppice/agent.py", 0o644),
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


def recipe_hash(r: Recipe, pool_public_key: str, uid_base: int, sshd_config: str) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "builder": BUILDER_VERSION,
                "name": r.name,
                "substrate": r.substrate,
                "suite": r.suite,
                "packages": list(r.packages),
                "key": pool_public_key,
                "uid_base": uid_base,
                "sshd": sshd_config,
            },
            sort_keys=True,
        ).encode()
    )
    for name in sorted(GUEST_FILES):
        h.update(name.encode() + b"\0" + _guest_file(name))
    for rel, data in _agent_files():
        h.update(rel.encode() + b"\0" + data)
    return h.hexdigest()


def base_hash(r: Recipe) -> str:
    key = json.dumps(
        {"builder": BUILDER_VERSION, "suite": r.suite, "packages": list(r.packages)}, sort_keys=True
    )
    return hashlib.sha256(key.encode()).hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _du(path: Path) -> int:
    total = 0
    seen: set[int] = set()
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


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
        self._check_prerequisites()
        key = PoolKey.at(self.settings.keys_dir).ensure()
        digest = recipe_hash(r, key.public_openssh, self.settings.jail_uid_base, SSHD_CONFIG)
        final = self.settings.templates_dir / name / digest
        with _locked(self.settings.templates_dir / f".{name}.lock"):
            if not force and (final / "rootfs").is_dir():
                try:
                    existing = self.store.get_template(name)
                except Exception:
                    existing = None
                if existing is not None and existing.recipe_hash == digest:
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
                self.progress.stage(
                    f"shifting owners into the jail id range (+{self.settings.jail_uid_base})"
                )
                shift_ownership(work / "rootfs", self.settings.jail_uid_base)
                size = _du(work / "rootfs")
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
                rootfs=str(final / "rootfs"),
                built_at=time.time(),
                build_seconds=time.monotonic() - started,
                size_bytes=size,
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
        with _locked(self.settings.templates_dir / f".{name}.lock"):
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

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise PrerequisiteMissing("building templates needs root (debootstrap, chroot)")
        if shutil.which("debootstrap") is None:
            raise PrerequisiteMissing("debootstrap is not installed; run scripts/setup")

    def _base_rootfs(self, r: Recipe) -> Path:
        digest = base_hash(r)
        cache = self.settings.build_cache_dir / f"base-{digest}"
        with _locked(self.settings.build_cache_dir / f".base-{digest}.lock"):
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
        for src, (dest, mode) in GUEST_FILES.items():
            path = root / dest
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_guest_file(src))
            path.chmod(mode)
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
