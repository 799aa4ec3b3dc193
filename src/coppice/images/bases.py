"""Where a build starts: the base image as a stack of cached layers.

A debootstrapped Debian (Coppice's own bases, from the host's mirror), an OCI image (skopeo
and umoci; well-known names E2B users write resolve to Coppice's bases so they work
offline), or another template's image. Each is imported once into a layer owned by the jail
id range and addressed by what it is made of (suite and packages, image digest, the other
template's image key).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coppice.config import Settings
from coppice.errors import CoppiceError, TemplateBuildError, TemplateNotFound
from coppice.images.file_lock import locked
from coppice.images.idshift import shift_ownership
from coppice.images.layers import LayerStore, Manifest
from coppice.images.mirror import debian_mirror
from coppice.images.oci import fetch_oci_rootfs
from coppice.images.spec import Base, FromDebian, FromImage, FromTemplate, ImageConfig
from coppice.images.well_known import well_known_base
from coppice.progress import Progress
from coppice.store.records import TemplateRecord
from coppice.store.store import Store

BASE_VERSION = "4"


@dataclass(frozen=True)
class ResolvedBase:
    manifest: Manifest
    #: how logs name it: "debian bookworm + 12 packages", "template base", an image reference
    description: str


class BaseResolver:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        layers: LayerStore,
        progress: Progress,
        build_recipe: Callable[[str], TemplateRecord],
    ) -> None:
        self.settings = settings
        self.store = store
        self.layers = layers
        self.progress = progress
        self.build_recipe = build_recipe

    def resolve(self, base: Base) -> ResolvedBase:
        if isinstance(base, FromImage):
            known = well_known_base(base.ref)
            if known is not None:
                resolved = self.resolve(known)
                return ResolvedBase(resolved.manifest, f"{base.ref} ({resolved.description})")
            return self._oci(base)
        if isinstance(base, FromTemplate):
            return self._template(base.name)
        return self._debian(base)

    # -- a debootstrapped Debian -------------------------------------------------------------

    def _debian(self, base: FromDebian) -> ResolvedBase:
        inputs = {"v": BASE_VERSION, "suite": base.suite, "packages": list(base.packages),
                  "uid_base": self.settings.jail_uid_base}  # fmt: skip
        key = "debian-" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        description = f"debian {base.suite} + {len(base.packages)} packages"
        found = self.layers.manifest(key)
        if found is not None:
            self.progress.note(f"base {description}: cached")
            return ResolvedBase(found, description)
        with locked(self.layers.root / f".{key}.lock"):
            found = self.layers.manifest(key)
            if found is None:
                work, lid = self.layers.new_layer(key)
                try:
                    self._debootstrap(base, work)
                    # Downloaded .debs and package lists would weigh on every layer above
                    # (the host keeps its own .deb cache for the next debootstrap).
                    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                        for path in (work / junk).glob("*"):
                            if path.is_file():
                                path.unlink()
                    self.progress.stage("shifting owners into the jail id range")
                    shift_ownership(work, self.settings.jail_uid_base)
                    self.layers.commit(work, lid)
                except BaseException:
                    self.layers.discard(work)
                    raise
                found = Manifest(key, (lid,), ImageConfig())
                self.layers.put_manifest(found)
        return ResolvedBase(found, description)

    def _debootstrap(self, base: FromDebian, target: Path) -> None:
        mirror = self.settings.debian_mirror or debian_mirror(base.suite)
        self.settings.deb_cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--cache-dir={self.settings.deb_cache_dir}",
            *([f"--include={','.join(base.packages)}"] if base.packages else []),
            base.suite,
            str(target),
            mirror,
        ]
        self.progress.stage(f"debootstrap {base.suite} + {len(base.packages)} packages")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail[-29:], line]
            self.progress.log(line, step="base")
            if line.startswith("I: "):
                self.progress.advance(line[3:])
        if proc.wait() != 0:
            hint = ""
            if any("No space left" in t for t in tail):
                hint = "; the disk is full: free space under " + str(self.settings.state_dir)
            raise TemplateBuildError(
                f"debootstrap failed (exit {proc.returncode}) using mirror {mirror}{hint}. "
                f"Last lines: {' | '.join(tail[-5:])}",
                step="base",
                log_tail=tuple(tail),
            )

    # -- an OCI image ------------------------------------------------------------------------

    def _oci(self, base: FromImage) -> ResolvedBase:
        fetched = fetch_oci_rootfs(
            base.ref, base.auth, self.settings.cache_dir / "oci", self.progress
        )
        key = f"oci-{fetched.digest.replace(':', '-')}-{self.settings.jail_uid_base}"
        found = self.layers.manifest(key)
        if found is None:
            with locked(self.layers.root / f".{key}.lock"):
                found = self.layers.manifest(key)
                if found is None:
                    work, lid = self.layers.new_layer(key)
                    try:
                        self.progress.stage(f"importing {base.ref}")
                        work.rmdir()
                        subprocess.run(
                            ["cp", "-a", "--reflink=auto", str(fetched.rootfs), str(work)],
                            check=True,
                            capture_output=True,
                        )
                        shift_ownership(work, self.settings.jail_uid_base)
                        self.layers.commit(work, lid)
                    except subprocess.CalledProcessError as exc:
                        self.layers.discard(work)
                        raise TemplateBuildError(
                            f"cannot import {base.ref}: {exc.stderr.decode(errors='replace')}",
                            step="base",
                        ) from exc
                    except BaseException:
                        self.layers.discard(work)
                        raise
                    envs = tuple(sorted(fetched.config.env))
                    found = Manifest(key, (lid,), ImageConfig(envs=envs))
                    self.layers.put_manifest(found)
        return ResolvedBase(found, base.ref)

    # -- another template --------------------------------------------------------------------

    def _template(self, name: str) -> ResolvedBase:
        record = self._template_record(name)
        final = self.layers.manifest(record.recipe_hash)
        if final is None or final.parent is None:
            raise TemplateBuildError(
                f"template {record.name} was built before templates could be bases (or its "
                f"layers were pruned); rebuild it with `coppice template build {record.name}`",
                step="base",
            )
        image = self.layers.manifest(final.parent)
        if image is None:
            raise TemplateBuildError(
                f"the layers of template {record.name} are gone from the build cache; "
                f"rebuild it with `coppice template build {record.name}`",
                step="base",
            )
        return ResolvedBase(image, f"template {record.name}")

    def _template_record(self, name: str) -> TemplateRecord:
        for record in self.store.list_templates():
            if name == record.name or name in record.policy.aliases:
                return record
        try:
            return self.build_recipe(name)
        except (TemplateNotFound, TemplateBuildError):
            raise
        except CoppiceError as exc:  # no such recipe either
            raise TemplateBuildError(
                f"there is no template {name!r} to build on: {exc}", step="base"
            ) from exc
