"""The `python-vm` template: built from scratch in the test instance, then booted once with a
plain QEMU command (user-mode networking on loopback) to prove the image itself works,
independently of the pool's QEMU driver."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coppice.config import Settings
from coppice.images.elf import notes
from coppice.images.keys import PoolKey
from coppice.pool.controller import PoolController
from coppice.store.records import TemplateRecord
from coppice.substrates.build_jail import template_builder
from coppice.substrates.readiness import ssh_banner

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BANNER_TIMEOUT_S = 90.0
#: the kernel command line of recipe R3 in the substrates reference, plus the TSC rate:
#: under TCG on a busy host the kernel's PIT calibration can fail, and without a TSC
#: frequency it then hangs before reaching /init
BASE_CMDLINE = (
    "console=ttyS0 panic=-1 quiet root=/dev/vda ro mitigations=off tsc=reliable "
    "no_timer_check random.trust_cpu=on 8250.nr_uarts=1 i8042.noaux i8042.nomux "
    "i8042.nopnp i8042.dumbkbd"
)


def host_tsc_khz() -> int:
    # TCG's guest TSC reads the host's, so the host's rate is the guest's.
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    raise AssertionError("no 'cpu MHz' in /proc/cpuinfo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def vm_template(controller: PoolController) -> TemplateRecord:
    record, _built = template_builder(controller.settings, controller.store).build("python-vm")
    return record


def test_vm_template_holds_kernel_initramfs_and_disk(
    vm_template: TemplateRecord, controller: PoolController
) -> None:
    vm_dir = Path(vm_template.rootfs)
    assert vm_template.substrate == "vm"
    assert vm_dir.name == "vm"
    assert sorted(p.name for p in vm_dir.parent.iterdir()) == ["vm"]
    assert sorted(p.name for p in vm_dir.iterdir()) == ["initrd.img", "rootfs.ext4", "vmlinux"]
    kernel = (vm_dir / "vmlinux").read_bytes()
    assert any((n.name, n.type) == (b"Xen", 18) for n in notes(kernel, "vmlinux"))
    assert gzip.decompress((vm_dir / "initrd.img").read_bytes())[:6] == b"070701"

    def stat_in_image(path: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", f"stat {path}", str(vm_dir / "rootfs.ext4")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    # VMs see real ids: nothing may be shifted into the jail id range.
    init = stat_in_image("/usr/lib/coppice/vm-init")
    assert "User:     0" in init and "Mode:  0755" in init
    assert "User:  1000" in stat_in_image("/home/user")

    again, built = template_builder(controller.settings, controller.store).build("python-vm")
    assert not built and again.recipe_hash == vm_template.recipe_hash


@dataclass
class BootedVm:
    pid: int
    ssh_port: int
    seconds_to_banner: float


@pytest.fixture()
def booted_vm(vm_template: TemplateRecord, instance_dir: Path) -> Iterator[BootedVm]:
    vm_dir = Path(vm_template.rootfs)
    port = free_port()
    cmdline = (
        f"{BASE_CMDLINE} tsc_early_khz={host_tsc_khz()} coppice.ip=10.0.2.15/24 "
        "coppice.gw=10.0.2.2 coppice.hostname=imagetest coppice.disk_mb=256 "
        "coppice.entry=image-test"
    )
    serial = instance_dir / "vm-image-test.serial"
    qemu_log = instance_dir / "vm-image-test.qemu.log"
    argv = [
        "qemu-system-x86_64",
        "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1",
        "-M", "microvm,x-option-roms=off", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", "-serial", f"file:{serial}",
        "-kernel", str(vm_dir / "vmlinux"), "-initrd", str(vm_dir / "initrd.img"),
        "-append", cmdline,
        "-drive", f"id=d0,file={vm_dir / 'rootfs.ext4'},if=none,format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=d0",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-device,netdev=n0",
    ]  # fmt: skip
    started = time.monotonic()
    with qemu_log.open("wb") as log:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        banner_at = None
        while time.monotonic() - started < BANNER_TIMEOUT_S and qemu.poll() is None:
            try:
                ssh_banner("127.0.0.1", port)
                banner_at = time.monotonic() - started
                break
            except OSError:
                time.sleep(0.25)
        if banner_at is None:
            console = serial.read_text(errors="replace") if serial.exists() else ""
            pytest.fail(
                f"no SSH banner within {BANNER_TIMEOUT_S:.0f} s (qemu exit {qemu.poll()}: "
                f"{qemu_log.read_text(errors='replace')[-500:]}); console: {console[-2000:]}"
            )
        yield BootedVm(qemu.pid, port, banner_at)
    finally:
        if qemu.poll() is None:
            os.kill(qemu.pid, signal.SIGKILL)
        qemu.wait(timeout=30)
        serial.unlink(missing_ok=True)
        qemu_log.unlink(missing_ok=True)


def test_vm_boots_to_ssh_with_a_writable_root_in_ram(
    booted_vm: BootedVm, settings: Settings
) -> None:
    print(f"boot to SSH banner: {booted_vm.seconds_to_banner:.1f} s")

    def ssh(command: str) -> str:
        argv = PoolKey.at(settings.keys_dir).ssh_argv("127.0.0.1", command, batch=True)
        done = subprocess.run(
            [argv[0], "-p", str(booted_vm.ssh_port), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert ssh("python3 -c 'print(1+1)'").strip() == "2"
    assert ssh("touch /x && stat -c %U /x && findmnt -n -o FSTYPE /").split() == [
        "root",
        "overlay",
    ]
    assert ssh("hostname; ip -4 -o addr show eth0").split()[:5] == [
        "imagetest",
        "2:",
        "eth0",
        "inet",
        "10.0.2.15/24",
    ]
    # The agent starts in the background of a shell, yet must not pass ignored SIGINT or
    # SIGQUIT on to what it runs (bits 1 and 2 of the mask: signals 2 and 3).
    status = ssh("grep SigIgn /proc/$(pgrep -o -f /usr/lib/coppice/agent.py)/status")
    assert int(status.split()[1], 16) & 0b110 == 0
    # PID 1 reaps orphans: a background child outliving its parent leaves no zombie.
    assert ssh("sh -c 'sleep 0.2 & exit 0'; sleep 2; ps -eo stat= | grep -c ^Z || true") == "0\n"
