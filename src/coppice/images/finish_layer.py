"""Coppice's own layer, on top of every template: the in-sandbox agent and its packages, the
guest init scripts of both substrates, sshd's configuration and the pool key, and the
template's config (`/etc/coppice/template.json`: user, workdir, envs, start and ready
commands) that the agent starts sandboxes with.

The files are staged on the host (owned by the jail id range) and put in place by a script
run as root in the build sandbox, so that nothing is written through the image's own paths
from the host side.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from coppice.config import Settings
from coppice.errors import TemplateBuildError
from coppice.images.file_lock import locked
from coppice.images.idshift import shift_ownership
from coppice.images.layers import LayerStore, Manifest
from coppice.images.spec import ImageConfig
from coppice.progress import Progress

FINISH_VERSION = "3"
#: where the agent and its locked dependencies live inside a template; only the agent's own
#: interpreter puts it on sys.path, so sandboxed code never imports from it by accident
AGENT_SITE = "usr/lib/coppice/site"
TEMPLATE_CONFIG = "etc/coppice/template.json"
STAGED = "/run/coppice-finish"
#: guest files by where they go; the initramfs' init is not in the root filesystem
GUEST_FILES = {
    "init.sh": ("usr/lib/coppice/init", 0o755),
    "agent.py": ("usr/lib/coppice/agent.py", 0o644),
    "zygote.py": ("usr/lib/coppice/zygote.py", 0o644),
    "kernel_zygote.py": ("usr/lib/coppice/kernel-zygote.py", 0o644),
    "vm-init.sh": ("usr/lib/coppice/vm-init", 0o755),
    "ssh-session.sh": ("usr/lib/coppice/ssh-session", 0o755),
    # A jail's processes have no_new_privs (bwrap), so setuid sudo cannot work there: the
    # shim asks the agent's sudo broker instead, and runs the real sudo where setuid works.
    "sudo.py": ("usr/bin/sudo", 0o755),
}
#: what the shared agent layer holds of them (the sudo shim replaces the image's own sudo,
#: which only a step over the image can do)
AGENT_LAYER_FILES = (
    "init.sh",
    "agent.py",
    "zygote.py",
    "kernel_zygote.py",
    "vm-init.sh",
    "ssh-session.sh",
)
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
# Sessions run as the OOM killer's candidates, sshd does not (see the script).
ForceCommand /usr/lib/coppice/ssh-session
"""
# Runs as root in the build sandbox. 9.8+ penalises sources that connect and leave without
# authenticating, which is exactly what the pool's readiness probe does.
FINISH_SCRIPT = f"""\
set -e
if ! command -v python3 >/dev/null 2>&1; then
  echo "the image has no python3, which Coppice's in-sandbox agent runs on: install python3 \
(3.11) in a RUN step, or start FROM a Debian bookworm based image" >&2
  exit 90
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "the image's python3 is $(python3 -V 2>&1); the in-sandbox agent needs Python 3.11: \
start FROM a Debian bookworm based image or install python3.11 as python3" >&2
  exit 91
fi
if [ ! -x /usr/sbin/sshd ]; then
  echo "the image has no /usr/sbin/sshd, which Coppice sandboxes serve SSH with: \
install openssh-server in a RUN step" >&2
  exit 92
fi
rm -f /etc/ssh/ssh_host_*
if command -v dpkg-divert >/dev/null 2>&1; then
  dpkg-divert --quiet --local --rename --divert /usr/bin/sudo.distrib --add /usr/bin/sudo
elif [ -e /usr/bin/sudo ] && [ ! -e /usr/bin/sudo.distrib ]; then
  mv /usr/bin/sudo /usr/bin/sudo.distrib
fi
cp -R -p {STAGED}/. /
sed -i "1s|^#!.*|#!$(command -v python3) -IS|" /usr/bin/sudo
if ssh -V 2>&1 | grep -qE 'OpenSSH_(9\\.[89]|9\\.[1-9][0-9]|[1-9][0-9]+\\.)'; then
  echo 'PerSourcePenalties no' >> /etc/ssh/sshd_config.d/coppice.conf
fi
chmod 700 /root/.ssh
chmod 600 /root/.ssh/authorized_keys
rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin
rm -rf /var/lib/apt/lists/*
"""


@dataclass(frozen=True)
class StartCommand:
    start_cmd: str | None
    ready_cmd: str | None
    warm_kernel: bool = True


def _guest_file(name: str) -> bytes:
    return resources.files("coppice.guest").joinpath(name).read_bytes()


def agent_files() -> list[tuple[str, bytes]]:
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


def agent_hash() -> str:
    h = hashlib.sha256()
    for rel, data in agent_files():
        h.update(rel.encode() + b"\0" + data)
    return h.hexdigest()


def template_config(config: ImageConfig, start: StartCommand) -> dict[str, object]:
    found: dict[str, object] = {
        **config.to_json(),
        "start_cmd": start.start_cmd,
        "ready_cmd": start.ready_cmd,
    }
    if not start.warm_kernel:
        # Only when off: the config (and so the layer's cache key) of every other template
        # stays what it was.
        found["warm_kernel"] = False
    return found


def finish_inputs(
    config: ImageConfig, start: StartCommand, public_key: str, name: str
) -> dict[str, object]:
    """Everything that decides Coppice's layer: its cache key's input."""
    guests = {n: hashlib.sha256(_guest_file(n)).hexdigest() for n in GUEST_FILES}
    return {
        "v": FINISH_VERSION,
        "agent": agent_hash(),
        "guest": guests,
        "sshd": SSHD_CONFIG,
        "key": public_key,
        "template": template_config(config, start),
        "name": name,
    }


class FinishLayer:
    def __init__(self, settings: Settings, progress: Progress) -> None:
        self.settings = settings
        self.progress = progress

    def agent_layer(self, layers: LayerStore) -> str:
        """The agent, its packages and the guest init scripts as a layer of their own, the
        same for every template: it only adds files under /usr/lib/coppice, so it stacks on
        any image, and a template's own finalize layer stays a few kilobytes."""
        guests = {n: hashlib.sha256(_guest_file(n)).hexdigest() for n in AGENT_LAYER_FILES}
        key = (
            "agent-"
            + hashlib.sha256(
                json.dumps(
                    [FINISH_VERSION, agent_hash(), guests, self.settings.jail_uid_base]
                ).encode()
            ).hexdigest()
        )
        with locked(layers.root / f".{key}.lock"):
            found = layers.manifest(key)
            if found is not None:
                return found.layers[0]
            site = self._agent_site()
            work, lid = layers.new_layer(key)
            try:
                work.chmod(0o755)
                shutil.copytree(site, work / AGENT_SITE, symlinks=True)
                for guest in AGENT_LAYER_FILES:
                    dest, mode = GUEST_FILES[guest]
                    path = work / dest
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(_guest_file(guest))
                    path.chmod(mode)
                for directory in (work / "usr", work / "usr/lib", work / "usr/lib/coppice"):
                    directory.chmod(0o755)
                shift_ownership(work, self.settings.jail_uid_base)
                layers.commit(work, lid)
            except BaseException:
                layers.discard(work)
                raise
            layers.put_manifest(Manifest(key, (lid,), ImageConfig()))
        return lid

    def stage(
        self, into: Path, config: ImageConfig, start: StartCommand, public_key: str, name: str
    ) -> None:
        """Lay the template's own files out under `into` as they go under `/`, owned by the
        jail's root (the agent comes in its own layer, `agent_layer`)."""
        for guest, (dest, mode) in GUEST_FILES.items():
            if guest in AGENT_LAYER_FILES:
                continue
            path = into / dest
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_guest_file(guest))
            path.chmod(mode)
        sshd = into / "etc/ssh/sshd_config.d/coppice.conf"
        sshd.parent.mkdir(parents=True, exist_ok=True)
        sshd.write_text(SSHD_CONFIG)
        keys = into / "root/.ssh/authorized_keys"
        keys.parent.mkdir(parents=True, mode=0o700)
        keys.write_text(public_key + "\n")
        conf = into / TEMPLATE_CONFIG
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(json.dumps(template_config(config, start), indent=2) + "\n")
        (into / "etc/coppice-template").write_text(f"COPPICE_TEMPLATE={name}\n")
        shift_ownership(into, self.settings.jail_uid_base)

    def _agent_site(self) -> Path:
        """The agent with its hash-locked wheels, installed once per agent version."""
        digest = agent_hash()[:24]
        site = self.settings.build_cache_dir / f"agent-{digest}"
        with locked(self.settings.build_cache_dir / f".agent-{digest}.lock"):
            if site.is_dir():
                return site
            self.progress.stage("installing the in-sandbox agent and its Python packages")
            work = site.with_name(f"{site.name}.tmp-{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            try:
                self._install_agent(work)
                work.rename(site)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        return site

    def _install_agent(self, site: Path) -> None:
        """Templates run the host's Python minor version on the same libc (Debian 12), so
        the host's pip picks matching wheels."""
        lock = site.parent / f"{site.name}.requirements.lock"
        lock.write_bytes(
            resources.files("coppice_agent").joinpath("requirements.lock").read_bytes()
        )
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--require-hashes", "--only-binary=:all:", "--target", str(site),
             "-r", str(lock)],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        lock.unlink()
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-4:])
            hint = ""
            if "No space left" in done.stderr:
                hint = f"; the disk is full: free space under {self.settings.state_dir}"
            raise TemplateBuildError(
                f"installing the agent's packages failed{hint}: {tail}. The package index "
                "comes from pip's own configuration (pip config list)",
                step="finalize",
            )
        for rel, data in agent_files():
            dest = site / "coppice_agent" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        # Byte-compile now: a sandbox would otherwise compile the agent at every start and
        # keep the .pyc files in its own writable layer.
        compileall.compile_dir(str(site / "coppice_agent"), quiet=1, workers=1)
