"""Runs one build step over its parent image and records the result as a new manifest.

RUN, COPY and WORKDIR change files, so they run in the build sandbox over the parent's
layers with a fresh upper directory that becomes the step's layer. COPY runs there too
(as root, with its sources shown read-only): the host never writes through a path the image
controls, so an image's symlink cannot point a copy at the host. ENV and USER change only
the image's config.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from coppice.config import Settings
from coppice.errors import TemplateBuildError
from coppice.images.build_files import BuildFiles
from coppice.images.build_plan import PlannedStep
from coppice.images.build_sandbox import Account, BuildRunner, lookup_account
from coppice.images.idshift import shift_ownership
from coppice.images.layers import LayerStore, Manifest
from coppice.images.spec import ImageConfig
from coppice.progress import Progress

STAGED = "/run/coppice-copy"
ROOT = Account("root", 0, 0, "/root")


class StepRunner:
    def __init__(
        self,
        settings: Settings,
        layers: LayerStore,
        sandbox: BuildRunner,
        files: BuildFiles | None,
        progress: Progress,
    ) -> None:
        self.settings = settings
        self.layers = layers
        self.sandbox = sandbox
        self.files = files
        self.progress = progress
        # Under the run directory, which is Coppice's own and searchable: the build
        # sandbox's root (mapped to an unprivileged id) must reach its mount point.
        self.mounts_dir = settings.run_dir / "build-mnt"

    def run(self, parent: Manifest, planned: PlannedStep) -> Manifest:
        step = planned.step
        config = parent.config.after(step)
        if step.kind == "ENV":
            return Manifest(planned.key, parent.layers, config)
        if step.kind == "USER":
            with self._view(parent) as root:
                lookup_account(root, step.args[0])
            return Manifest(planned.key, parent.layers, config)
        if step.kind == "WORKDIR":
            script = _workdir_script(config.workdir, parent.config.user)
            return self._in_new_layer(parent, planned, config, script, ROOT)
        if step.kind == "RUN":
            user_name = step.args[1] if len(step.args) > 1 and step.args[1] else config.user
            return self._in_new_layer(parent, planned, config, step.args[0], user_name)
        return self._copy(parent, planned, config)

    def run_script(
        self,
        parent: Manifest,
        planned: PlannedStep,
        script: str,
        binds: Sequence[tuple[Path, str]] = (),
    ) -> Manifest:
        """`script` as root in a new layer over `parent` (Coppice's own steps)."""
        return self._in_new_layer(parent, planned, parent.config, script, ROOT, binds)

    # -- file-changing steps ------------------------------------------------------------------

    def _in_new_layer(
        self,
        parent: Manifest,
        planned: PlannedStep,
        config: ImageConfig,
        command: str,
        user: str | Account,
        binds: Sequence[tuple[Path, str]] = (),
    ) -> Manifest:
        work, lid = self.layers.new_layer(planned.key)
        base = self.settings.jail_uid_base
        # The upper directory's own owner and mode become those of the image's `/`.
        os.chown(work, base, base)
        work.chmod(0o755)
        target = self.mounts_dir / lid
        try:
            with self.layers.mounted(parent.layers, work, target) as root:
                account = user if isinstance(user, Account) else lookup_account(root, user)
                workdir = config.workdir if (root / config.workdir.lstrip("/")).is_dir() else "/"
                status, tail = self.sandbox.run(
                    root,
                    command,
                    account,
                    workdir,
                    config.env_dict(),
                    lambda line: self.progress.log(line, step=planned.number),
                    binds,
                )
            if status != 0:
                label = planned.step.label().splitlines()[0][:200]
                raise TemplateBuildError(
                    f"step {planned.number} ({label}) failed with exit status {status}"
                    + (f": {tail[-1]}" if tail else ""),
                    step=planned.number,
                    log_tail=tail,
                )
            target.rmdir()
            if not any(work.iterdir()):
                self.layers.discard(work)
                return Manifest(planned.key, parent.layers, config)
            self.layers.commit(work, lid)
        except BaseException:
            self.layers.discard(work)
            if target.is_dir() and not os.path.ismount(target):
                target.rmdir()
            raise
        return Manifest(planned.key, (*parent.layers, lid), config)

    @contextmanager
    def _view(self, parent: Manifest) -> Iterator[Path]:
        target = self.mounts_dir / f"view-{parent.key[:16]}-{os.getpid()}"
        try:
            with self.layers.mounted(parent.layers, None, target) as root:
                yield root
        finally:
            if target.is_dir() and not os.path.ismount(target):
                target.rmdir()

    def _copy(self, parent: Manifest, planned: PlannedStep, config: ImageConfig) -> Manifest:
        step = planned.step
        # The SDK leaves `$VAR` in COPY's paths for the builder, as Docker expands them.
        env = config.env_dict()
        src, dest = expand_vars(step.args[0], env), expand_vars(step.args[1], env)
        owner = step.args[2] if len(step.args) > 2 and step.args[2] else config.user
        mode = step.args[3] if len(step.args) > 3 and step.args[3] else ""
        if self.files is None or step.files_hash is None:
            raise TemplateBuildError(
                f"step {planned.number} copies {src} but the build has no files",
                step=planned.number,
            )
        context = self.files.root_for(step.files_hash)
        matches = _matches(context, src, planned.number)
        staging = self.layers.root / "staging" / planned.key[:24]
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            names: list[tuple[str, bool]] = []
            for i, path in enumerate(matches):
                name = f"{i}"
                if path.is_dir() and not path.is_symlink():
                    shutil.copytree(path, staging / name, symlinks=True)
                else:
                    shutil.copy2(path, staging / name, follow_symlinks=False)
                names.append((path.name, path.is_dir() and not path.is_symlink()))
            # Readable inside the sandbox only if owned by an id its namespace maps.
            shift_ownership(staging, self.settings.jail_uid_base)
            dest_abs = posixpath.normpath(posixpath.join(config.workdir, dest))
            # A wildcard names a set of files, so dest is their directory (as E2B's own
            # builder and BuildKit treat it), whatever it ends with.
            into_dir = dest.endswith("/") or len(matches) > 1 or _is_glob(src)
            script = _copy_script(names, dest_abs, into_dir, owner, mode)
            return self._in_new_layer(
                parent, planned, config, script, ROOT, binds=[(staging, STAGED)]
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand_vars(text: str, env: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` from the image's environment; an unset name is empty."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), text)


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _matches(context: Path, src: str, number: str) -> list[Path]:
    rel = posixpath.normpath(src.lstrip("/")) if src not in (".", "./") else "."
    if rel.startswith(".."):
        raise TemplateBuildError(
            f"step {number}: COPY source {src} leaves the build context", step=number
        )
    if _is_glob(rel):
        found = sorted(context.glob(rel))
    else:
        found = [context / rel] if (context / rel).exists() or (context / rel).is_symlink() else []
    if not found:
        raise TemplateBuildError(
            f"step {number}: COPY source {src} is not in the build context", step=number
        )
    return found


def _copy_script(
    names: list[tuple[str, bool]], dest: str, into_dir: bool, owner: str, mode: str
) -> str:
    """Docker's COPY rules: a directory's contents go into dest; a file goes to dest, or
    into it when dest ends with / (or is a directory, or several sources are copied)."""
    q = shlex.quote
    lines = ["set -e", "umask 022"]
    targets: list[str] = []
    for i, (name, is_dir) in enumerate(names):
        staged = f"{STAGED}/{i}"
        if is_dir:
            lines += [f"mkdir -p {q(dest)}", f"cp -R -p {q(staged)}/. {q(dest)}/"]
            targets.append(dest)
        else:
            lines.append(f"if [ -d {q(dest)} ]; then d={q(dest)}/{q(name)}; "
                         f"elif [ {int(into_dir)} = 1 ]; then mkdir -p {q(dest)}; "
                         f"d={q(dest)}/{q(name)}; else mkdir -p \"$(dirname {q(dest)})\"; "
                         f"d={q(dest)}; fi")  # fmt: skip
            lines.append(f'cp -P -p {q(staged)} "$d"')
            targets.append('"$d"')
    for target in targets:
        if owner and owner != "root":
            # `name:` is the account's own group, as Docker's --chown=name gives.
            lines.append(f"chown -R {q(owner if ':' in owner else owner + ':')} {target}")
        if mode:
            lines.append(f"chmod {q(mode)} {target}")
    return "\n".join(lines)


def _workdir_script(path: str, user: str) -> str:
    q = shlex.quote
    return (
        f"if [ ! -d {q(path)} ]; then mkdir -p {q(path)}; "
        f"{'' if user == 'root' else f'chown {q(user)} {q(path)} || true; '}fi"
    )
