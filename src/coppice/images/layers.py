"""The build cache: one directory per step result (a layer), stacked by overlayfs.

A layer holds what one step changed, owned by the jail id range (root inside a jail is
`jail_uid_base` outside), so the same stack is a build sandbox's lower root, the next step's
parent, and a jail template's root without any copy. A manifest per step key names the
layers of the image after that step (bottom first) and the image's config; a step that
changes no files (ENV, USER) gets a manifest and no layer.

Layers are written once and never changed: a running sandbox may have any of them as a
lower directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coppice.errors import TemplateBuildError
from coppice.host import mounts
from coppice.images.spec import ImageConfig

#: overlayfs takes its options in one page; past this many layers a stack is squashed
MAX_STACK = 48


@dataclass(frozen=True)
class Manifest:
    key: str
    #: layer ids, bottom (the base) first
    layers: tuple[str, ...]
    config: ImageConfig
    #: a finished template's image before Coppice's own layer: what `FROM` that template uses
    parent: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "layers": list(self.layers),
            "config": self.config.to_json(),
            "parent": self.parent,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        c = data["config"]
        config = ImageConfig(c["user"], c["workdir"], tuple(sorted(c["envs"].items())))
        return cls(data["key"], tuple(data["layers"]), config, data.get("parent"))


def new_layer_id(key: str) -> str:
    """Short names keep a deep stack inside overlayfs' one-page option string; the random
    part means a forced rebuild of a step never replaces a layer a sandbox has mounted."""
    return f"{key[:16]}{secrets.token_hex(4)}"


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers_dir = root / "layers"
        self.manifests_dir = root / "manifests"

    def layer_path(self, lid: str) -> Path:
        return self.layers_dir / lid

    def manifest(self, key: str) -> Manifest | None:
        path = self.manifests_dir / f"{key}.json"
        try:
            found = Manifest.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError):
            return None
        if all(self.layer_path(lid).is_dir() for lid in found.layers):
            return found
        return None  # a layer was pruned: the step runs again

    def put_manifest(self, manifest: Manifest) -> None:
        self.manifests_dir.mkdir(parents=True, exist_ok=True)
        path = self.manifests_dir / f"{manifest.key}.json"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(manifest.to_json()))
        tmp.rename(path)

    def new_layer(self, key: str) -> tuple[Path, str]:
        """A fresh, empty work directory for a layer of `key` and the id `commit` gives it."""
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        lid = new_layer_id(key)
        work = self.layers_dir / f"{lid}.tmp"
        work.mkdir()
        return work, lid

    def commit(self, work: Path, lid: str) -> str:
        work.rename(self.layer_path(lid))
        return lid

    def discard(self, work: Path) -> None:
        for point in mounts.mounts_under(work):
            mounts.unmount(point)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(work.with_name(work.name + ".work"), ignore_errors=True)

    def lowerdir(self, layers: tuple[str, ...]) -> str:
        """overlayfs' lowerdir option: the top layer first."""
        return ":".join(str(self.layer_path(lid)) for lid in reversed(layers))

    @contextmanager
    def mounted(self, layers: tuple[str, ...], upper: Path | None, target: Path) -> Iterator[Path]:
        """The stack at `target`; writes go to `upper` (whose sibling `<upper>.work` is
        overlayfs' work directory). Without `upper` the view is read-only."""
        target.mkdir(parents=True, exist_ok=True)
        if upper is None and len(layers) == 1:
            mounts.mount(str(self.layer_path(layers[0])), target, "", _MS_BIND | _MS_RDONLY)
        else:
            options = f"lowerdir={self.lowerdir(layers)}"
            work = None
            if upper is not None:
                work = upper.with_name(upper.name + ".work")
                work.mkdir(exist_ok=True)
                options += f",upperdir={upper},workdir={work}"
            if len(options) > 4000:
                raise TemplateBuildError(
                    f"the image has {len(layers)} layers, more than overlayfs can stack; "
                    "merge some RUN or COPY steps"
                )
            try:
                mounts.mount("overlay", target, "overlay", 0, options)
            except OSError as exc:
                raise TemplateBuildError(f"cannot stack the image's layers: {exc}") from exc
        try:
            yield target
        finally:
            mounts.unmount(target)
            if upper is not None:
                shutil.rmtree(upper.with_name(upper.name + ".work"), ignore_errors=True)


_MS_RDONLY = 0x1
_MS_BIND = 0x1000
