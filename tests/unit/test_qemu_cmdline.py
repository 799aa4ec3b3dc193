"""QEMU command lines of the golden VM and its clones."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

from coppice.substrates.qemu_cmdline import (
    IDENTITY_PORT,
    ROOT_SERIAL,
    WRITABLE_SERIAL,
    GuestIdentity,
    MachineSpec,
    ignore_shared_capability,
    kernel_cmdline,
    load_uri,
    qemu_argv,
    save_uri,
    tsc_khz_from_cpuinfo,
)

GOLDEN = MachineSpec(
    accel="tcg",
    memory_mb=512,
    kernel=Path("/t/vm/vmlinux"),
    initrd=Path("/t/vm/initrd.img"),
    root_disk=Path("/t/vm/rootfs.ext4"),
    writable_disk=Path("/s/vm-golden/.k.tmp-1/writable.raw"),
    writable_format="raw",
    tap="cgold1234abcd",
    mac="02:c0:0a:4d:00:02",
    ram_file=Path("/dev/shm/coppice-vm-k.ram"),
    share_ram=True,
    console_log=Path("/run/c/vm-golden/k/console.log"),
    qmp_socket=Path("/run/c/vm-golden/k/qmp.sock"),
    identity_socket=Path("/run/c/vm-golden/k/identity.sock"),
    guest=GuestIdentity("10.77.0.2/24", "10.77.0.1", "golden", 1024, "golden"),
    incoming=False,
)
CLONE = replace(
    GOLDEN,
    writable_disk=Path("/s/vm-disks/abc.qcow2"),
    writable_format="qcow2",
    tap="ctapabc",
    mac="02:c0:0a:4d:00:39",
    share_ram=False,
    console_log=Path("/run/c/vm/abc/console.log"),
    qmp_socket=Path("/run/c/vm/abc/qmp.sock"),
    identity_socket=Path("/run/c/vm/abc/identity.sock"),
    guest=GuestIdentity("10.77.0.57/24", "10.77.0.1", "python-vm-1", 1024, "abc"),
    incoming=True,
    tb_size_mb=32,
)


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_golden_boots_the_kernel_with_its_identity_on_the_command_line() -> None:
    argv = qemu_argv(GOLDEN)
    assert argv[0] == "qemu-system-x86_64"
    assert _value(argv, "-M") == "microvm,x-option-roms=off"
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv)
    assert _value(argv, "-accel") == "tcg"
    assert _value(argv, "-kernel") == "/t/vm/vmlinux"
    assert _value(argv, "-initrd") == "/t/vm/initrd.img"
    append = _value(argv, "-append")
    assert append.startswith("console=ttyS0 panic=-1 root=/dev/vda ro")
    assert "no_timer_check" not in append.split()  # it made half of the boots hang
    for param in (
        "coppice.ip=10.77.0.2/24",
        "coppice.gw=10.77.0.1",
        "coppice.hostname=golden",
        "coppice.disk_mb=1024",
    ):
        assert param in append.split()
    assert "-incoming" not in argv


def test_golden_ram_is_the_shared_file_and_clone_ram_a_private_mapping_of_it() -> None:
    golden, clone = qemu_argv(GOLDEN), qemu_argv(CLONE)
    assert (
        _value(golden, "-object")
        == "memory-backend-file,id=mem0,size=512M,mem-path=/dev/shm/coppice-vm-k.ram,share=on"
    )
    assert _value(clone, "-object").endswith("mem-path=/dev/shm/coppice-vm-k.ram,share=off")
    assert _value(golden, "-machine") == _value(clone, "-machine") == "memory-backend=mem0"
    assert _value(golden, "-m") == _value(clone, "-m") == "512"


def test_clone_waits_for_its_state_and_boots_nothing() -> None:
    argv = qemu_argv(CLONE)
    assert _value(argv, "-incoming") == "defer"
    assert "-kernel" not in argv and "-append" not in argv and "-initrd" not in argv
    assert _value(argv, "-accel") == "tcg,tb-size=32"


def test_clone_devices_match_the_golden_in_kind_and_order() -> None:
    def devices(argv: list[str]) -> list[str]:
        return [d.split(",")[0] for d in _values(argv, "-device")]

    assert (
        devices(qemu_argv(GOLDEN))
        == devices(qemu_argv(CLONE))
        == [
            "virtio-blk-device",
            "virtio-blk-device",
            "virtio-net-device",
            "virtio-serial-device",
            "virtserialport",
        ]
    )


def test_template_disk_is_shared_read_only_and_the_writable_disk_is_the_vms_own() -> None:
    golden, clone = qemu_argv(GOLDEN), qemu_argv(CLONE)
    root = "id=d0,file=/t/vm/rootfs.ext4,if=none,format=raw,readonly=on"
    assert _values(golden, "-drive")[0] == _values(clone, "-drive")[0] == root
    assert _values(golden, "-drive")[1] == (
        "id=d1,file=/s/vm-golden/.k.tmp-1/writable.raw,if=none,format=raw,"
        "cache=unsafe,discard=unmap"
    )
    assert _values(clone, "-drive")[1] == (
        "id=d1,file=/s/vm-disks/abc.qcow2,if=none,format=qcow2,cache=unsafe,discard=unmap"
    )
    # The guest finds each disk by its serial, whatever order the kernel probes them in.
    assert _values(clone, "-device")[:2] == [
        f"virtio-blk-device,drive=d0,serial={ROOT_SERIAL}",
        f"virtio-blk-device,drive=d1,serial={WRITABLE_SERIAL}",
    ]
    append = _value(golden, "-append").split()
    assert f"coppice.root_serial={ROOT_SERIAL}" in append
    assert f"coppice.rw_serial={WRITABLE_SERIAL}" in append
    assert len(ROOT_SERIAL) <= 20 and len(WRITABLE_SERIAL) <= 20  # VIRTIO_BLK_ID_BYTES


def test_initramfs_init_reads_the_serials_the_command_line_names() -> None:
    text = resources.files("coppice.guest").joinpath("initramfs-init.sh").read_text()
    assert "coppice.root_serial=*)" in text and "coppice.rw_serial=*)" in text


def test_per_vm_plumbing() -> None:
    argv = qemu_argv(CLONE)
    assert _value(argv, "-netdev") == "tap,id=n0,ifname=ctapabc,script=no,downscript=no"
    assert "virtio-net-device,netdev=n0,mac=02:c0:0a:4d:00:39" in _values(argv, "-device")
    assert (
        _value(argv, "-chardev")
        == "socket,id=id0,path=/run/c/vm/abc/identity.sock,server=on,wait=off"
    )
    assert f"virtserialport,chardev=id0,name={IDENTITY_PORT}" in _values(argv, "-device")
    assert _value(argv, "-serial") == "file:/run/c/vm/abc/console.log"
    assert _value(argv, "-qmp") == "unix:/run/c/vm/abc/qmp.sock,server=on,wait=off"


def test_kvm_takes_no_translation_cache_size() -> None:
    assert _value(qemu_argv(replace(CLONE, accel="kvm")), "-accel") == "kvm"


def test_kernel_cmdline_carries_the_entry() -> None:
    assert (
        "coppice.ip=10.77.0.57/24 coppice.gw=10.77.0.1 coppice.hostname=python-vm-1 "
        "coppice.disk_mb=1024 coppice.entry=abc"
    ) in kernel_cmdline(CLONE.guest)


def test_migration_uris_quote_paths() -> None:
    assert save_uri(Path("/s/it's/device.state")) == "exec:cat > '/s/it'\\''s/device.state'"
    assert load_uri(Path("/s/device.state")) == "exec:cat '/s/device.state'"
    assert ignore_shared_capability() == {
        "capabilities": [{"capability": "x-ignore-shared", "state": True}]
    }


CPUINFO = """\
processor	: 0
model name	: AMD EPYC
cpu MHz		: 2596.096
flags		: fpu tsc constant_tsc nonstop_tsc tsc_known_freq rdtscp
processor	: 1
cpu MHz		: 1800.000
"""


def test_a_boot_whose_tsc_calibration_hung_is_told_the_hosts_rate() -> None:
    assert tsc_khz_from_cpuinfo(CPUINFO) == 2596096
    # Without a known, constant TSC, "cpu MHz" is the current clock, not the TSC's rate.
    assert tsc_khz_from_cpuinfo(CPUINFO.replace(" tsc_known_freq", "")) is None
    assert tsc_khz_from_cpuinfo("processor\t: 0\n") is None
    argv = qemu_argv(replace(GOLDEN, tsc_khz=2596096))
    assert _value(argv, "-append").split()[-1] == "tsc_early_khz=2596096"
    assert "tsc_early_khz" not in _value(qemu_argv(GOLDEN), "-append")
