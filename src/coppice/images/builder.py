"""Builds templates: a base, the template's steps, Coppice's own layer, then what each
substrate boots from it.

    base (debootstrap | OCI image | another template)      layers, cached by what they are
      + "base" step: the `user` account E2B images have      (owned by the jail id range)
      + the template's steps (RUN, COPY, ENV, WORKDIR, USER), each cached by
        (parent, step, hash of its files)
      + "finalize": agent, guest init, sshd config, pool key, /etc/coppice/template.json
    jail: the layer stack is the template's root (overlay lower directories, no copy)
    vm:   the stack flattened into a kernel, initramfs and ext4 disk

An unchanged template is a no-op (every key is known before anything runs); a changed last
step runs only that step and the finalize layer. A failed build changes nothing that
serves: the template's record is replaced only when the new version is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from contextlib import AbstractContextManager, ExitStack
from importlib import resources
from pathlib import Path

from coppice.config import Limits, Settings
from coppice.errors import Conflict, PrerequisiteMissing, TemplateBuildError
from coppice.images.bases import BaseResolver
from coppice.images.build_files import BuildFiles, ContextDir
from coppice.images.build_plan import PlannedStep, plan_build
from coppice.images.build_sandbox import BuildRunner, SandboxFactory
from coppice.images.disk_image import tree_usage
from coppice.images.file_lock import locked
from coppice.images.finish_layer import (
    FINISH_SCRIPT,
    STAGED,
    FinishLayer,
    StartCommand,
    finish_inputs,
)
from coppice.images.idshift import unshift_ownership
from coppice.images.kernel import cached_kernel, current_kernel_release, require_apt_tools
from coppice.images.keys import PoolKey
from coppice.images.layers import LayerStore, Manifest
from coppice.images.recipes import RECIPE_FILES, recipe
from coppice.images.spec import Step, TemplateSpec
from coppice.images.step_runner import StepRunner
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

#: tools a vm template build runs, besides apt's (the QEMU ones are checked so that a
#: template is never built on a host that cannot boot it)
VM_TOOLS = ("qemu-system-x86_64", "qemu-img", "mkfs.ext4")
BUILD_TOOLS = {"bwrap": "bubblewrap", "unshare": "util-linux", "nsenter": "util-linux",
               "debootstrap": "debootstrap"}  # fmt: skip
#: E2B's images all have `user` (uid 1000, passwordless sudo); so does every template here
ENSURE_USER = """\
set -e
if ! id -u user >/dev/null 2>&1; then
  shell=$(command -v bash || echo /bin/sh)
  if command -v useradd >/dev/null 2>&1; then
    useradd --create-home --uid 1000 --user-group --shell "$shell" user
  else
    adduser -D -u 1000 -s "$shell" user
  fi
fi
home=$(getent passwd user | cut -d: -f6)
mkdir -p "$home"
chown user: "$home"
mkdir -p /etc/sudoers.d
chmod 0755 /etc/sudoers.d
echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/coppice-user
chmod 0440 /etc/sudoers.d/coppice-user
"""
STEPS_VERSION = "1"
ENSURE_USER_STEP = Step("RUN", (ENSURE_USER, "root"))
#: how long the agent lets a start command's ready check take (its own default)
START_READY_S = 120.0
#: what a build sandbox may use at least, whatever the template's sandboxes get
BUILD_MEMORY_MB = 2048


def policy_of(spec: TemplateSpec) -> TemplatePolicy:
    """What the template's sandboxes run with, as the spec says at build time."""
    return TemplatePolicy(
        limits=spec.limits,
        aliases=spec.aliases,
        cold_start=spec.cold_start,
        pool_target=spec.pool_target,
        # The agent gives a ready check START_READY_S; the warm waits a little longer so
        # that it hears the agent's reason rather than timing out first.
        ready_timeout_s=START_READY_S + 30.0 if spec.start_cmd else None,
    )


def _initramfs_init() -> bytes:
    return resources.files("coppice.guest").joinpath("initramfs-init.sh").read_bytes()


def _vm_inputs(kernel_release: str) -> dict[str, object]:
    """What a vm template is made of besides the root filesystem. The kernel release is
    part of it, so a new Debian kernel (after `apt-get update`) makes a new template; so is
    the initramfs's /init, which decides how the guest's root is put together."""
    return {
        "image": VM_IMAGE_VERSION,
        "kernel": kernel_release,
        "modules": list(INITRAMFS_MODULES),
        "busybox": hashlib.sha256(static_busybox()).hexdigest(),
        "init": hashlib.sha256(_initramfs_init()).hexdigest(),
    }


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class TemplateBuilder:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        progress: Progress | None = None,
        sandboxes: SandboxFactory | None = None,
    ):
        """`sandboxes`: what build steps run in (`coppice.substrates.build_jail`); a
        builder without it can find, list and remove templates but not build them."""
        self.settings = settings
        self.store = store
        self.progress = progress or SilentProgress()
        self.sandboxes = sandboxes
        self.layers = LayerStore(settings.build_cache_dir)

    def build(self, name: str, force: bool = False) -> tuple[TemplateRecord, bool]:
        """Build (or find cached) the built-in template `name`."""
        return self.build_spec(recipe(name), ContextDir(RECIPE_FILES), force)

    def build_spec(
        self, spec: TemplateSpec, files: BuildFiles | None = None, force: bool = False
    ) -> tuple[TemplateRecord, bool]:
        """Build (or find cached) `spec`; returns its record and whether anything was built.
        Raises TemplateBuildError naming the failing step (E2B's numbering) and its log."""
        self._check_prerequisites(spec.substrate)
        key = PoolKey.at(self.settings.keys_dir).ensure()
        force = force or spec.force
        self.settings.templates_dir.mkdir(parents=True, exist_ok=True)
        with locked(self.settings.templates_dir / f".{spec.name}.lock"):
            started = time.monotonic()
            resolver = BaseResolver(
                self.settings, self.store, self.layers, self.progress, self._build_recipe
            )
            base = resolver.resolve(spec.base)
            steps = (ENSURE_USER_STEP, *spec.steps)
            # How steps are carried out is part of every step's key.
            chain_start = _digest(STEPS_VERSION, base.manifest.key)
            plan = plan_build(
                chain_start, steps, lambda k: self.layers.manifest(k) is not None, force
            )
            image_key = plan.final_key
            # The finalize layer's key needs the image's config, which is the steps' fold.
            config = base.manifest.config
            for s in steps:
                config = config.after(s)
            start = StartCommand(spec.start_cmd, spec.ready_cmd, spec.warm_kernel)
            inputs = finish_inputs(config, start, key.public_openssh, spec.name)
            vm_inputs = None
            if spec.substrate == "vm":
                vm_inputs = _vm_inputs(current_kernel_release())
            final_key = _digest(image_key, inputs, vm_inputs)
            existing = self._existing(spec, final_key)
            if existing is not None and not force:
                self.progress.note(f"template {spec.name} is up to date ({final_key[:12]})")
                return existing, False
            self.progress.note(f"base: {base.description}")
            manifest = self._run_steps(spec, base.manifest, plan.steps, files)
            final = self._finish(spec, manifest, final_key, start, key.public_openssh)
            rootfs, size = self._artefacts(spec, final, final_key, vm_inputs)
            record = TemplateRecord(
                name=spec.name,
                substrate=spec.substrate,
                recipe_hash=final_key,
                rootfs=rootfs,
                built_at=time.time(),
                build_seconds=time.monotonic() - started,
                size_bytes=size,
                policy=policy_of(spec),
            )
            self.store.put_template(record)
            self._prune_old_versions(spec.name, keep=final_key)
            return record, True

    def _build_recipe(self, name: str) -> TemplateRecord:
        """A `FROM` of a built-in template that is not built yet builds it first."""
        self.progress.note(f"building template {name} first: this template starts from it")
        return self.build(name)[0]

    def _existing(self, spec: TemplateSpec, final_key: str) -> TemplateRecord | None:
        try:
            existing = self.store.get_template(spec.name)
        except Exception:
            return None
        if existing.recipe_hash != final_key or self.layers.manifest(final_key) is None:
            return None
        if spec.substrate == "vm" and not (Path(existing.rootfs) / ROOT_DISK).is_file():
            return None
        if existing.policy != policy_of(spec):
            existing = dataclasses.replace(existing, policy=policy_of(spec))
            self.store.put_template(existing)
        return existing

    def _sandbox(
        self, spec: TemplateSpec, with_network: bool
    ) -> AbstractContextManager[BuildRunner]:
        if self.sandboxes is None:
            raise PrerequisiteMissing(
                "this template builder has no build sandbox; make it with "
                "coppice.substrates.build_jail.template_builder"
            )
        return self.sandboxes(self._build_limits(spec), with_network)

    def _build_limits(self, spec: TemplateSpec) -> Limits:
        limits = spec.limits or self.settings.limits
        return Limits(
            memory_mb=max(limits.memory_mb, BUILD_MEMORY_MB),
            pids=max(limits.pids, 4096),
            cpus=max(limits.cpus, float(os.cpu_count() or 1)),
            disk_mb=limits.disk_mb,
        )

    def _run_steps(
        self,
        spec: TemplateSpec,
        base: Manifest,
        steps: tuple[PlannedStep, ...],
        files: BuildFiles | None,
    ) -> Manifest:
        current = base
        total = len(steps) - 1  # the user step is part of the base, as E2B numbers steps
        with ExitStack() as stack:
            runner: StepRunner | None = None
            for index, planned in enumerate(steps):
                # E2B names the base "base" and numbers the template's own steps from 1.
                number = "base" if index == 0 else str(index)
                planned = dataclasses.replace(planned, number=number)
                label = planned.step.label().splitlines()[0][:100]
                if planned.cached:
                    found = self.layers.manifest(planned.key)
                    assert found is not None
                    current = found
                    if index > 0:
                        self.progress.log(f"CACHED [{index}/{total}] {label}", step=number)
                    continue
                if runner is None:
                    sandbox = stack.enter_context(self._sandbox(spec, with_network=True))
                    runner = StepRunner(self.settings, self.layers, sandbox, files, self.progress)
                title = "preparing the base" if index == 0 else f"[{index}/{total}] {label}"
                self.progress.stage(title)
                self.progress.log(title, step=number)
                step_started = time.monotonic()
                current = runner.run(current, planned)
                self.layers.put_manifest(current)
                self.progress.log(f"done in {time.monotonic() - step_started:.1f} s", step=number)
        return current

    def _finish(
        self,
        spec: TemplateSpec,
        image: Manifest,
        final_key: str,
        start: StartCommand,
        public_key: str,
    ) -> Manifest:
        found = self.layers.manifest(final_key)
        if found is not None:
            return found
        self.progress.stage("finalize: the in-sandbox agent, sshd and the template's config")
        staging = self.layers.root / "staging" / f"finish-{final_key[:24]}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            finish = FinishLayer(self.settings, self.progress)
            agent = finish.agent_layer(self.layers)
            finish.stage(staging, image.config, start, public_key, spec.name)
            step = Step("RUN", ("finalize", "root"))
            planned = PlannedStep("finalize", step, final_key, False)
            with_agent = Manifest(image.key, (*image.layers, agent), image.config)
            with self._sandbox(spec, with_network=False) as sandbox:
                runner = StepRunner(self.settings, self.layers, sandbox, None, self.progress)
                made = runner.run_script(with_agent, planned, FINISH_SCRIPT, [(staging, STAGED)])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        final = Manifest(final_key, made.layers, image.config, parent=image.key)
        self.layers.put_manifest(final)
        return final

    def _artefacts(
        self,
        spec: TemplateSpec,
        final: Manifest,
        final_key: str,
        vm_inputs: dict[str, object] | None,
    ) -> tuple[str, int]:
        if vm_inputs is None:
            size = sum(tree_usage(self.layers.layer_path(lid)).bytes for lid in final.layers)
            return self.layers.lowerdir(final.layers), size
        out_dir = self.settings.templates_dir / spec.name / final_key
        work = out_dir.with_name(f"{final_key}.tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            self.progress.stage("flattening the image for the vm")
            view = self.settings.run_dir / "build-mnt" / f"flat-{final_key[:16]}"
            with self.layers.mounted(final.layers, None, view) as root:
                subprocess.run(
                    ["cp", "-a", "--reflink=auto", f"{root}/.", str(work / "rootfs")],
                    check=True,
                    capture_output=True,
                )
            view.rmdir()
            unshift_ownership(work / "rootfs", self.settings.jail_uid_base)
            kernel = cached_kernel(
                self.settings.cache_dir / "kernels", str(vm_inputs["kernel"]), self.progress
            )
            build_vm_image(
                work / "rootfs",
                work / "vm",
                kernel,
                _initramfs_init(),
                self.progress,
            )
            shutil.rmtree(work / "rootfs")
            size = tree_usage(work / "vm").bytes
            shutil.rmtree(out_dir, ignore_errors=True)
            work.rename(out_dir)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise TemplateBuildError(
                f"cannot flatten the image: {exc.stderr.decode(errors='replace')}",
                step="finalize",
            ) from exc
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return str(out_dir / "vm"), size

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
        # Running entries keep their old version busy; only prune when idle.
        directory = self.settings.templates_dir / name
        if self.store.list_entries(name) or not directory.is_dir():
            return
        for old in directory.iterdir():
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def _check_prerequisites(self, substrate: str) -> None:
        if os.geteuid() != 0:
            raise PrerequisiteMissing("building templates needs root (namespaces, overlayfs)")
        for tool, package in BUILD_TOOLS.items():
            if shutil.which(tool) is None:
                raise PrerequisiteMissing(f"{tool} is not installed ({package}); run scripts/setup")
        if substrate == "vm":
            for tool in VM_TOOLS:
                if shutil.which(tool) is None:
                    raise PrerequisiteMissing(
                        f"{tool} is not installed (vm templates need QEMU and e2fsprogs); "
                        "run scripts/setup"
                    )
            static_busybox()
            require_apt_tools()
