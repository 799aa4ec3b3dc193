"""Kernel modules: which files, in which order, to load a given set of drivers.

Debian's kernel package ships no modules.dep and the host has no depmod (its own kernel is
monolithic), so when the tree lacks one we write it from each module's `.modinfo`
`depends=` field. The file then has depmod's format, with direct dependencies only, which is
all `load_order` needs.
"""

from __future__ import annotations

import lzma
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from coppice.errors import TemplateBuildError
from coppice.images.elf import section

MODULE_SUFFIXES = (".ko", ".ko.xz")


@dataclass(frozen=True)
class KernelModule:
    name: str
    #: relative to the modules directory, as modules.dep spells it
    path: str
    depends: tuple[str, ...]


def canonical_name(name: str) -> str:
    """The kernel treats '-' and '_' in module names alike; so do we."""
    return name.replace("-", "_")


def module_name(path: str) -> str:
    base = PurePosixPath(path).name
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            return canonical_name(base[: -len(suffix)])
    raise TemplateBuildError(f"{path} is not a kernel module (.ko or .ko.xz)")


def parse_modules_dep(text: str) -> dict[str, KernelModule]:
    modules: dict[str, KernelModule] = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if not sep:
            continue
        name = module_name(path.strip())
        modules[name] = KernelModule(
            name, path.strip(), tuple(module_name(d) for d in deps.split())
        )
    return modules


def render_modules_dep(modules: Iterable[KernelModule], paths: Mapping[str, str]) -> str:
    lines = []
    for m in sorted(modules, key=lambda m: m.path):
        lines.append(f"{m.path}: {' '.join(paths[d] for d in m.depends)}".rstrip() + "\n")
    return "".join(lines)


def parse_builtin(text: str) -> frozenset[str]:
    return frozenset(module_name(line.strip()) for line in text.splitlines() if line.strip())


def load_order(
    wanted: Iterable[str], modules: Mapping[str, KernelModule], builtin: frozenset[str]
) -> list[KernelModule]:
    """Every module `wanted` needs, each after its dependencies, in a stable order.

    Independent modules keep the order in which `wanted` names them, so a caller can put a
    module first that another one only asks for at run time (crc32c before ext4).
    Built-in drivers are skipped: there is nothing to load.
    """
    order: list[KernelModule] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str, needed_by: str | None) -> None:
        name = canonical_name(name)
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise TemplateBuildError(f"kernel modules depend on each other in a cycle: {cycle}")
        module = modules.get(name)
        if module is None:
            if name in builtin:
                done.add(name)
                return
            by = f" (needed by {needed_by})" if needed_by else ""
            raise TemplateBuildError(f"the kernel has no module {name}{by}")
        visiting.append(name)
        for dep in module.depends:
            visit(dep, name)
        visiting.pop()
        done.add(name)
        order.append(module)

    for name in wanted:
        visit(name, None)
    return order


def read_module(path: Path) -> bytes:
    """The module's ELF bytes: the initramfs's busybox insmod takes them uncompressed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as exc:
            raise TemplateBuildError(f"{path}: not a valid xz file: {exc}") from exc
    return data


def modinfo_depends(data: bytes, what: str) -> tuple[str, ...]:
    info = section(data, ".modinfo", what)
    if info is None:
        raise TemplateBuildError(f"{what} has no .modinfo section")
    for field in info.split(b"\0"):
        key, sep, value = field.partition(b"=")
        if sep and key == b"depends":
            return tuple(canonical_name(d) for d in value.decode().split(",") if d)
    return ()


def scan_modules(modules_dir: Path) -> dict[str, KernelModule]:
    """What depmod would find: every module under `modules_dir` with its dependencies."""
    found: dict[str, KernelModule] = {}
    for dirpath, _dirs, files in os.walk(modules_dir):
        for filename in files:
            if not filename.endswith(MODULE_SUFFIXES):
                continue
            full = Path(dirpath) / filename
            rel = str(full.relative_to(modules_dir))
            depends = modinfo_depends(read_module(full), rel)
            found[module_name(rel)] = KernelModule(module_name(rel), rel, depends)
    return found


def write_modules_dep(modules_dir: Path) -> None:
    modules = scan_modules(modules_dir)
    paths = {name: m.path for name, m in modules.items()}
    missing = {d for m in modules.values() for d in m.depends} - set(paths)
    if missing:
        raise TemplateBuildError(
            f"modules in {modules_dir} depend on modules it does not have: "
            f"{', '.join(sorted(missing))}"
        )
    (modules_dir / "modules.dep").write_text(render_modules_dep(modules.values(), paths))


def module_index(modules_dir: Path) -> tuple[dict[str, KernelModule], frozenset[str]]:
    """(loadable modules, built-in module names) of an extracted kernel's module tree."""
    dep = modules_dir / "modules.dep"
    if not dep.is_file():
        write_modules_dep(modules_dir)
    builtin = modules_dir / "modules.builtin"
    return (
        parse_modules_dep(dep.read_text()),
        parse_builtin(builtin.read_text()) if builtin.is_file() else frozenset(),
    )
