"""What a template is made of, as plain data: a base, a list of steps, a start command.

Every way of asking for a template ends here: the E2B build API (`TemplateBuildStartV2`, as
the SDK's `Template` builder sends it), a Dockerfile (which the SDK's own parser turns into
the same JSON), and Coppice's built-in recipes. The builder only ever sees a `TemplateSpec`.

E2B's semantics, kept: steps run as `user` in `/home/user` unless a USER or WORKDIR step says
otherwise, and the last USER, WORKDIR and ENV are what the template's sandboxes start with.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from coppice.config import Limits
from coppice.errors import InvalidRequest, NotSupportedYet

StepKind = Literal["RUN", "COPY", "ENV", "WORKDIR", "USER"]
STEP_KINDS: tuple[StepKind, ...] = ("RUN", "COPY", "ENV", "WORKDIR", "USER")
#: what a template can run on (the substrates' registry lives above this layer)
BUILDABLE_SUBSTRATES = ("jail", "vm")
#: E2B's defaults for steps and sandboxes (not Docker's root in /)
DEFAULT_USER = "user"
DEFAULT_WORKDIR = "/home/user"


@dataclass(frozen=True)
class Step:
    """One build instruction, as E2B's wire format has it.

    RUN: (command, [user]); COPY: (src, dest, [user[:group]], [octal mode]) with `files_hash`
    naming the uploaded archive that holds `src`; ENV: (k1, v1, k2, v2, ...); WORKDIR: (path,);
    USER: (name,).
    """

    kind: StepKind
    args: tuple[str, ...]
    files_hash: str | None = None
    #: run even when the cache holds a result for it (and so every step after it)
    force: bool = False

    def label(self) -> str:
        """How logs and errors name this step: `RUN pip install numpy`."""
        shown = " ".join(a for a in self.args if a)
        return f"{self.kind} {shown}" if shown else self.kind

    def cache_json(self) -> str:
        """What decides the step's result besides its parent: never `force`."""
        return json.dumps([self.kind, list(self.args), self.files_hash], separators=(",", ":"))


@dataclass(frozen=True)
class FromDebian:
    """A Debian root made by debootstrap from the host's mirror: Coppice's own bases."""

    suite: str
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegistryAuth:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class FromImage:
    """An OCI image: a well-known name Coppice serves from its own bases, a registry
    reference, or a local archive or layout (`oci-archive:/path`, `oci:/dir:tag`,
    `docker-archive:/path`), fetched with skopeo and unpacked with umoci."""

    ref: str
    auth: RegistryAuth | None = None


@dataclass(frozen=True)
class FromTemplate:
    """Another template's image (its layers, not its running sandboxes)."""

    name: str


Base = FromDebian | FromImage | FromTemplate


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    base: Base
    steps: tuple[Step, ...] = ()
    #: runs at warm, before the entry is frozen, as the template's user in its workdir
    start_cmd: str | None = None
    #: a shell command that exits 0 once the start command is serving; retried until then
    ready_cmd: str | None = None
    substrate: str = "jail"
    #: None: the host's defaults (Settings.limits)
    limits: Limits | None = None
    aliases: tuple[str, ...] = ()
    cold_start: bool = True
    #: warm entries the gateway keeps when its pool_targets does not name the template
    pool_target: int | None = None
    #: start the default Python kernel at warm, so the first run_code finds it running;
    #: False: on the first run_code (a template whose SDK has no run_code, like E2B's base,
    #: then warms without one: a fraction of the CPU and memory)
    warm_kernel: bool = True
    #: rebuild every step whatever the cache holds
    force: bool = False
    description: str = ""


@dataclass(frozen=True)
class ImageConfig:
    """What sandboxes (and the next build step) start with, folded from the steps."""

    user: str = DEFAULT_USER
    workdir: str = DEFAULT_WORKDIR
    envs: tuple[tuple[str, str], ...] = ()

    def env_dict(self) -> dict[str, str]:
        return dict(self.envs)

    def after(self, step: Step) -> ImageConfig:
        if step.kind == "USER":
            return ImageConfig(step.args[0], self.workdir, self.envs)
        if step.kind == "WORKDIR":
            path = posixpath.normpath(posixpath.join(self.workdir, step.args[0]))
            return ImageConfig(self.user, path, self.envs)
        if step.kind == "ENV":
            envs = dict(self.envs)
            pairs = step.args
            for i in range(0, len(pairs) - 1, 2):
                envs[pairs[i]] = pairs[i + 1]
            return ImageConfig(self.user, self.workdir, tuple(sorted(envs.items())))
        return self

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "workdir": self.workdir, "envs": dict(self.envs)}


def fold_config(steps: Sequence[Step], start: ImageConfig | None = None) -> ImageConfig:
    config = start or ImageConfig()
    for step in steps:
        config = config.after(step)
    return config


def step_key(parent_key: str, step: Step) -> str:
    """The cache key of a step's result: its parent's key, the step, the hash of its files."""
    return hashlib.sha256(f"{parent_key}\n{step.cache_json()}".encode()).hexdigest()


def _string_list(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{where} must be a list of strings")
    return tuple(value)


def parse_step(raw: object, index: int) -> Step:
    where = f"steps[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"{where} must be an object")
    kind = raw.get("type")
    if kind not in STEP_KINDS:
        raise InvalidRequest(
            f"{where}: unknown step type {kind!r}; Coppice builds {', '.join(STEP_KINDS)}"
        )
    args = _string_list(raw.get("args"), f"{where}.args")
    files_hash = raw.get("filesHash")
    if files_hash is not None and not isinstance(files_hash, str):
        raise InvalidRequest(f"{where}.filesHash must be a string")
    need = {"RUN": 1, "COPY": 2, "ENV": 2, "WORKDIR": 1, "USER": 1}[kind]
    if len(args) < need or (kind in ("RUN", "WORKDIR", "USER") and not args[0].strip()):
        raise InvalidRequest(f"{where}: {kind} needs at least {need} argument(s), got {args}")
    if kind == "ENV" and len(args) % 2:
        raise InvalidRequest(f"{where}: ENV takes name and value pairs, got {args}")
    if kind == "COPY" and not files_hash:
        raise InvalidRequest(f"{where}: COPY {args[0]} has no filesHash to take its files from")
    return Step(kind, args, files_hash, bool(raw.get("force", False)))


def spec_from_e2b(
    name: str,
    body: Mapping[str, Any],
    *,
    limits: Limits | None = None,
    substrate: str = "jail",
) -> TemplateSpec:
    """A `TemplateBuildStartV2` body as the SDK sends it. Unknown fields are refused, never
    ignored: a field Coppice does not act on would otherwise build the wrong image."""
    known = {"fromImage", "fromTemplate", "fromImageRegistry", "force", "steps", "startCmd",
             "readyCmd", "substrate"}  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequest(f"unknown build field(s) {', '.join(unknown)}")
    from_image, from_template = body.get("fromImage"), body.get("fromTemplate")
    if from_image and from_template:
        raise InvalidRequest("give fromImage or fromTemplate, not both")
    base: Base
    if from_template:
        if not isinstance(from_template, str):
            raise InvalidRequest("fromTemplate must be a string")
        base = FromTemplate(from_template)
    else:
        image = from_image or "e2bdev/base"
        if not isinstance(image, str):
            raise InvalidRequest("fromImage must be a string")
        base = FromImage(image, _registry_auth(body.get("fromImageRegistry")))
    raw_steps = body.get("steps") or []
    if not isinstance(raw_steps, list):
        raise InvalidRequest("steps must be a list")
    steps = tuple(parse_step(raw, i) for i, raw in enumerate(raw_steps))
    start_cmd, ready_cmd = body.get("startCmd"), body.get("readyCmd")
    for label, value in (("startCmd", start_cmd), ("readyCmd", ready_cmd)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"{label} must be a string")
    chosen = body.get("substrate", substrate)
    if chosen not in BUILDABLE_SUBSTRATES:
        raise InvalidRequest(
            f"substrate {chosen!r} is not one Coppice builds for; give one of "
            f"{', '.join(BUILDABLE_SUBSTRATES)}"
        )
    return TemplateSpec(
        name=name,
        base=base,
        steps=steps,
        start_cmd=start_cmd or None,
        ready_cmd=ready_cmd or None,
        substrate=chosen,
        limits=limits,
        # As the built-in vm template: a VM that is not in the pool boots for seconds
        # (minutes under TCG), so an empty pool answers 429 rather than hang a create.
        cold_start=chosen != "vm",
        force=bool(body.get("force", False)),
    )


def _registry_auth(raw: object) -> RegistryAuth | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidRequest("fromImageRegistry must be an object")
    kind = raw.get("type")
    if kind != "registry":
        raise NotSupportedYet(
            f"fromImageRegistry type {kind!r}",
            "Coppice pulls with a username and password (type 'registry') only",
        )
    username, password = raw.get("username"), raw.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise InvalidRequest("fromImageRegistry needs a username and a password")
    return RegistryAuth(username, password)
