"""Turns a customised root filesystem into what a `vm` template boots: the directory `vm/`
with `vmlinux`, `initrd.img` and `rootfs.ext4`. The QEMU driver relies on these names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from coppice.errors import PrerequisiteMissing, TemplateBuildError
from coppice.images.disk_image import make_ext4
from coppice.images.elf import has_interpreter
from coppice.images.initramfs import ModuleFile, build_initramfs
from coppice.images.kernel import Kernel
from coppice.images.kernel_modules import load_order, module_index, read_module
from coppice.progress import Progress

VMLINUX = "vmlinux"
INITRD = "initrd.img"
ROOT_DISK = "rootfs.ext4"
BUSYBOX = Path("/bin/busybox")
#: what the initramfs loads to reach the root disk and set up the guest (dependencies are
#: added): virtio over MMIO (microvm) and PCI, the disk, the network, ext4 (crc32c first:
#: ext4 asks for it only when mounting, where nothing could load it), the overlay that
#: makes the root writable on the VM's own disk, and the channels the QEMU driver may use
#: (vsock, virtio-serial) plus the virtio RNG that reseeds restored clones
INITRAMFS_MODULES = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "overlay",
    "vsock",
    "vmw_vsock_virtio_transport",
    "virtio_console",
    "virtio-rng",
)
#: bumped whenever the image layout or the way it is made changes, to rebuild vm templates
VM_IMAGE_VERSION = "1"


def static_busybox() -> bytes:
    if not BUSYBOX.is_file():
        raise PrerequisiteMissing(
            f"{BUSYBOX} is missing (package busybox-static); run scripts/setup"
        )
    data = BUSYBOX.read_bytes()
    if has_interpreter(data, str(BUSYBOX)):
        raise PrerequisiteMissing(
            f"{BUSYBOX} is dynamically linked but the initramfs has no libraries; install "
            "busybox-static instead of busybox (scripts/setup)"
        )
    return data


def initramfs_modules(kernel: Kernel) -> list[ModuleFile]:
    modules, builtin = module_index(kernel.modules_dir)
    files = []
    for m in load_order(INITRAMFS_MODULES, modules, builtin):
        data = read_module(kernel.modules_dir / m.path)
        files.append(ModuleFile(PurePosixPath(m.path).name.removesuffix(".xz"), data))
    return files


def build_vm_image(
    rootfs: Path, out: Path, kernel: Kernel, init_script: bytes, progress: Progress
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # The kernel cache is shared by every template; a hard link is free and stays valid
    # even if the cache is cleared later.
    try:
        os.link(kernel.vmlinux, out / VMLINUX)
    except OSError:
        shutil.copyfile(kernel.vmlinux, out / VMLINUX)
    progress.stage("building initramfs")
    (out / INITRD).write_bytes(
        build_initramfs(static_busybox(), init_script, initramfs_modules(kernel))
    )
    progress.stage("making ext4 image")
    make_ext4(rootfs, out / ROOT_DISK)
    made = sorted(p.name for p in out.iterdir())
    if made != sorted((VMLINUX, INITRD, ROOT_DISK)):
        raise TemplateBuildError(f"{out} holds {made}, not exactly the three VM image files")
