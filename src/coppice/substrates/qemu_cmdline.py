"""QEMU command lines for the `vm` substrate: pure functions of what one VM needs.

The golden VM and its clones run the *same* machine (devices, order, memory size): a clone is
an incoming migration of the golden's saved device state, and QEMU only accepts a stream that
matches its own device layout. What differs is per-VM plumbing (tap, sockets, console file),
whether guest RAM is the shared golden file (`share=on`, the golden writes it) or a private
copy-on-write mapping of it (`share=off`, a clone), and `-incoming defer` on clones. Clones get
no kernel, initrd or command line: nothing boots in them (firmware does not run again after an
incoming migration), and QEMU need not read a 66 MB kernel for every clone.

Two disks: the template's ext4 image, raw and read-only (every VM of the template opens the
same file; the guest cannot write it even if it tried), and the VM's own writable disk, the
upper layer of the guest's overlay root (see vm_disk). The guest's initramfs tells them
apart by their virtio serials, which the kernel command line names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

IDENTITY_PORT = "coppice.identity"
#: virtio-blk serials of the two disks (at most 20 bytes: VIRTIO_BLK_ID_BYTES)
ROOT_SERIAL = "coppice-root"
WRITABLE_SERIAL = "coppice-rw"
# From substrates.md R3, which shave about a second off a TCG boot: microvm has no i8042
# worth probing, one UART is enough, and TCG's TSC is reliable. Two of R3's are left out on
# purpose: with `no_timer_check` half of the boots hung for good waiting for the first timer
# tick (jiffies stuck at its initial value), and without `quiet` the console shows how far a
# boot got, which is what tells a hung boot from a slow one.
TUNED_KERNEL_ARGS = (
    "console=ttyS0",
    "panic=-1",
    "root=/dev/vda",
    "ro",
    "mitigations=off",
    "tsc=reliable",
    "random.trust_cpu=on",
    "8250.nr_uarts=1",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
)


@dataclass(frozen=True)
class GuestIdentity:
    """What the guest's init reads from the kernel command line at boot."""

    ip_cidr: str
    gateway: str
    hostname: str
    disk_mb: int
    entry_id: str


@dataclass(frozen=True)
class MachineSpec:
    accel: str
    memory_mb: int
    kernel: Path
    initrd: Path
    #: the template's raw ext4 image, attached read-only
    root_disk: Path
    #: the VM's writable disk: the golden's own raw file, or a clone's qcow2 overlay on it
    writable_disk: Path
    writable_format: Literal["raw", "qcow2"]
    tap: str
    mac: str
    #: the golden's RAM file; None for RAM of the VM's own (a memfd), which a VM restored
    #: from a saved state of its own or booted on a kept disk has
    ram_file: Path | None
    #: True for the golden VM (writes the RAM file), False for clones (private mapping)
    share_ram: bool
    console_log: Path
    qmp_socket: Path
    identity_socket: Path
    guest: GuestIdentity
    #: clones wait for `migrate-incoming` instead of booting
    incoming: bool
    #: TCG translation cache size; None leaves QEMU's default (up to 1 GiB, grown on use)
    tb_size_mb: int | None = None
    #: the TSC rate the kernel is told instead of measuring it (see tsc_khz_from_cpuinfo)
    tsc_khz: int | None = None


def tsc_khz_from_cpuinfo(cpuinfo: str) -> int | None:
    """The host's TSC rate, which is the guest's under TCG (its rdtsc reads the host's), for
    a kernel whose calibration against the PIT failed: on a busy host the emulated PIT
    ticks too unevenly ("tsc: Unable to calibrate against PIT") and the boot then hangs.
    Only a host whose TSC runs at a known, constant rate says it here."""
    flags: set[str] = set()
    mhz = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value)
    if mhz is None or not {"constant_tsc", "tsc_known_freq"} <= flags:
        return None
    return round(mhz * 1000)


def kernel_cmdline(guest: GuestIdentity, tsc_khz: int | None = None) -> str:
    return " ".join(
        (
            *TUNED_KERNEL_ARGS,
            f"coppice.ip={guest.ip_cidr}",
            f"coppice.gw={guest.gateway}",
            f"coppice.hostname={guest.hostname}",
            f"coppice.disk_mb={guest.disk_mb}",
            f"coppice.entry={guest.entry_id}",
            f"coppice.root_serial={ROOT_SERIAL}",
            f"coppice.rw_serial={WRITABLE_SERIAL}",
            *([f"tsc_early_khz={tsc_khz}"] if tsc_khz is not None else []),
        )
    )


#: how QEMU names RAM of a VM's own in its mappings (for the usage read from smaps)
OWN_RAM_MAPPING = "/memfd:mem0"


def memory_backend(spec: MachineSpec) -> str:
    """Guest RAM. Either way its RAM block is `mem0`, so a state saved from a clone of the
    golden loads into a VM with RAM of its own: migration matches blocks by name and size."""
    if spec.ram_file is None:
        return f"memory-backend-memfd,id=mem0,size={spec.memory_mb}M"
    share = "on" if spec.share_ram else "off"
    return (
        f"memory-backend-file,id=mem0,size={spec.memory_mb}M,mem-path={spec.ram_file},share={share}"
    )


def qemu_argv(spec: MachineSpec, binary: str = "qemu-system-x86_64") -> list[str]:
    accel = spec.accel
    if spec.tb_size_mb is not None and spec.accel == "tcg":
        accel += f",tb-size={spec.tb_size_mb}"
    boot = (
        []
        if spec.incoming
        else [
            "-kernel",
            str(spec.kernel),
            "-initrd",
            str(spec.initrd),
            "-append",
            kernel_cmdline(spec.guest, spec.tsc_khz),
        ]
    )
    argv = [
        binary,
        "-M",
        "microvm,x-option-roms=off",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-accel",
        accel,
        "-cpu",
        "max",
        "-m",
        str(spec.memory_mb),
        "-smp",
        "1",
        "-object",
        memory_backend(spec),
        "-machine",
        "memory-backend=mem0",
        *boot,
        "-drive",
        f"id=d0,file={spec.root_disk},if=none,format=raw,readonly=on",
        "-device",
        f"virtio-blk-device,drive=d0,serial={ROOT_SERIAL}",
        # cache=unsafe: the disk lives and dies with its VM, so a guest's fsync need not
        # reach the host's disk. discard: files the guest deletes give their space back.
        "-drive",
        f"id=d1,file={spec.writable_disk},if=none,format={spec.writable_format},"
        "cache=unsafe,discard=unmap",
        "-device",
        f"virtio-blk-device,drive=d1,serial={WRITABLE_SERIAL}",
        "-netdev",
        f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
        "-device",
        f"virtio-net-device,netdev=n0,mac={spec.mac}",
        "-device",
        "virtio-serial-device",
        "-chardev",
        f"socket,id=id0,path={spec.identity_socket},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=id0,name={IDENTITY_PORT}",
        "-serial",
        f"file:{spec.console_log}",
        "-qmp",
        f"unix:{spec.qmp_socket},server=on,wait=off",
        "-no-reboot",
    ]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv


def ignore_shared_capability() -> dict[str, object]:
    """RAM lives in the shared file, so migration must skip it and save devices only."""
    return {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


def save_uri(device_state: Path) -> str:
    return f"exec:cat > {_shell_quote(device_state)}"


def load_uri(device_state: Path) -> str:
    return f"exec:cat {_shell_quote(device_state)}"


def _shell_quote(path: Path) -> str:
    text = str(path)
    return "'" + text.replace("'", "'\\''") + "'"
