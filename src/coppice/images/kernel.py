"""The guest kernel: Debian's linux-image package, unpacked once per version on this host.

QEMU's microvm boots a kernel directly through its PVH entry, which only the uncompressed
ELF (vmlinux) has; Debian ships a bzImage (vmlinuz) whose payload is xz, so we decompress
that payload. Packages come through `apt-get download`, i.e. from whatever the host's apt
configuration points at. The result lives under `<cache_dir>/kernels/<release>/`:
`vmlinux` and `modules/` (the package's lib/modules/<release> tree, plus a modules.dep).
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from coppice.errors import PrerequisiteMissing, TemplateBuildError
from coppice.images.elf import notes
from coppice.images.file_lock import locked
from coppice.images.kernel_modules import module_index
from coppice.progress import Progress

#: Debian's metapackage that always depends on the current kernel of the suite
KERNEL_METAPACKAGE = "linux-image-amd64"
XZ_MAGIC = b"\xfd7zXZ\x00"
#: Xen's PHYS32_ENTRY ELF note: the PVH entry point QEMU jumps to
PVH_NOTE = (b"Xen", 18)
_KERNEL_PACKAGE = re.compile(r"^linux-image-(\d[\w.+~-]*-amd64)$")
_APT_UPDATE_HINT = "run `apt-get update` (the host's package lists may be missing or stale)"


@dataclass(frozen=True)
class Kernel:
    #: `uname -r` of the guest, e.g. 6.1.0-57-amd64
    release: str
    root: Path

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"

    @property
    def package(self) -> str:
        return f"linux-image-{self.release}"


def kernel_release_of(apt_cache_depends: str) -> str:
    """The kernel release the metapackage depends on, from `apt-cache depends` output."""
    for line in apt_cache_depends.splitlines():
        kind, _, target = line.strip().lstrip("|").partition(":")
        m = _KERNEL_PACKAGE.match(target.strip())
        if kind == "Depends" and m:
            return m.group(1)
    raise TemplateBuildError(
        f"{KERNEL_METAPACKAGE} depends on no linux-image-<version>-amd64 package; "
        f"{_APT_UPDATE_HINT}"
    )


def current_kernel_release() -> str:
    done = subprocess.run(
        ["apt-cache", "depends", KERNEL_METAPACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise TemplateBuildError(
            f"apt-cache does not know {KERNEL_METAPACKAGE}: {done.stderr.strip()}; "
            f"{_APT_UPDATE_HINT}"
        )
    return kernel_release_of(done.stdout)


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The uncompressed kernel ELF inside a bzImage whose payload is xz-compressed."""
    offset = vmlinuz.find(XZ_MAGIC)
    if offset < 0:
        raise TemplateBuildError("the kernel image holds no xz-compressed payload")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        vmlinux = decompressor.decompress(vmlinuz[offset:])
    except lzma.LZMAError as exc:
        raise TemplateBuildError(f"the kernel's xz payload does not decompress: {exc}") from exc
    if not decompressor.eof:
        raise TemplateBuildError("the kernel's xz payload is truncated")
    return vmlinux


def check_pvh_entry(vmlinux: bytes, what: str) -> None:
    if not any((n.name, n.type) == PVH_NOTE for n in notes(vmlinux, what)):
        raise TemplateBuildError(
            f"{what} has no PVH entry note, so QEMU's microvm cannot boot it "
            "(the kernel needs CONFIG_PVH=y)"
        )


def cached_kernel(cache_root: Path, release: str, progress: Progress) -> Kernel:
    """The kernel `release`, fetched and unpacked unless this host already has it."""
    kernel = Kernel(release, cache_root / release)
    with locked(cache_root / f".{release}.lock"):
        if kernel.vmlinux.is_file() and (kernel.modules_dir / "modules.dep").is_file():
            progress.note(f"kernel {release} cached")
            return kernel
        progress.stage(f"fetching kernel {release}")
        work = cache_root / f".{release}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            _unpack(_download(kernel.package, work), work, release)
            shutil.rmtree(kernel.root, ignore_errors=True)
            (work / "kernel").rename(kernel.root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return kernel


def _download(package: str, into: Path) -> Path:
    done = subprocess.run(
        ["apt-get", "download", "-q", package],
        cwd=into,
        capture_output=True,
        text=True,
        check=False,
    )
    debs = sorted(into.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise TemplateBuildError(f"apt-get download {package} failed: {tail}; {_APT_UPDATE_HINT}")
    return debs[-1]


def _unpack(deb: Path, work: Path, release: str) -> None:
    tree = work / "deb"
    done = subprocess.run(
        ["dpkg-deb", "-x", str(deb), str(tree)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise TemplateBuildError(f"dpkg-deb cannot unpack {deb.name}: {done.stderr.strip()}")
    deb.unlink()
    vmlinuz = tree / "boot" / f"vmlinuz-{release}"
    modules = tree / "lib" / "modules" / release
    if not vmlinuz.is_file() or not modules.is_dir():
        raise TemplateBuildError(f"{deb.name} has no boot/vmlinuz-{release} or its modules")
    vmlinux = extract_vmlinux(vmlinuz.read_bytes())
    check_pvh_entry(vmlinux, f"kernel {release}")
    out = work / "kernel"
    out.mkdir()
    (out / "vmlinux").write_bytes(vmlinux)
    modules.rename(out / "modules")
    module_index(out / "modules")  # writes modules.dep when the package ships none


def require_apt_tools() -> None:
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PrerequisiteMissing(
                f"{tool} is missing; vm templates take their kernel from Debian's packages "
                "and need a Debian host with apt"
            )
