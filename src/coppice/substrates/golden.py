"""Golden snapshots: one booted, warm VM per template, saved so that clones start in 0.2 s.

The golden VM boots with its RAM in a file on /dev/shm mapped shared, so the file *is* the
guest's memory. Once its agent is warm, it is stopped and only its device state is saved
(`x-ignore-shared` leaves RAM out of the stream, 60-odd KB and a few ms). Clones map the same
file private (copy-on-write), so they share every page they do not write.

The golden boots with its writable disk (vm_disk) attached and mounted as the upper layer
of its root, so what the snapshot's page cache and mounted filesystem say about that disk is
true of the file it leaves behind, which every clone's disk is an overlay on.

On disk, per template version (`<template>-<recipe hash[:12]>`):
  <state_dir>/vm-golden/<key>/meta.json        what the snapshot is and which files it has
  <state_dir>/vm-golden/<key>/device.state     the saved device state
  <state_dir>/vm-golden/<key>/writable.raw     its writable disk as saved (read-only since)
  <state_dir>/vm-golden/<key>/writable-seed.qcow2  an empty overlay on it, each clone's disk
  /dev/shm/<namespace>-vm-<key>.ram            guest RAM (tmpfs: gone after a reboot, and
                                               then the snapshot is rebuilt on demand)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from coppice.config import Limits, Settings
from coppice.errors import SubstrateError
from coppice.host.processes import ProcessIdentity
from coppice.net.tap import GOLDEN_PREFIX, TapDevices
from coppice.store.ipam import mac_for
from coppice.store.records import TemplateRecord
from coppice.substrates import qemu_process, readiness
from coppice.substrates.base import AGENT_PORT, SSH_PORT
from coppice.substrates.identity_port import IdentityPort
from coppice.substrates.qemu_cmdline import (
    GuestIdentity,
    MachineSpec,
    ignore_shared_capability,
    qemu_argv,
    save_uri,
    tsc_khz_from_cpuinfo,
)
from coppice.substrates.qmp_channel import QmpChannel
from coppice.substrates.vm_disk import make_golden_disk, make_seed, writable_disk_bytes

#: 2: the writable layer is a disk (writable.raw and its seed), no longer guest RAM
META_VERSION = 2
BOOT_ATTEMPTS = 3
#: a TCG boot reaches the initramfs within a few seconds; one that has not after this long
#: has wedged in the kernel (the guest clock stuck at zero, e.g. "tsc: Unable to calibrate
#: against PIT"), which happened to roughly one boot in ten here, and is booted again
BOOT_STALL_S = 45.0
INIT_MARKER = b"Run /init as init process"
#: what a boot that hung in the TSC's calibration printed; the next boot is told the rate
PIT_CALIBRATION_FAILED = b"tsc: Unable to calibrate against PIT"
log = logging.getLogger("coppice.vm")
SHM_DIR = Path("/dev/shm")
KERNEL, INITRD, DISK = "vmlinux", "initrd.img", "rootfs.ext4"
WRITABLE, WRITABLE_SEED = "writable.raw", "writable-seed.qcow2"


@dataclass(frozen=True)
class VmImage:
    kernel: Path
    initrd: Path
    disk: Path

    @classmethod
    def at(cls, root: Path) -> VmImage:
        return cls(root / KERNEL, root / INITRD, root / DISK)

    @classmethod
    def of(cls, template: TemplateRecord) -> VmImage:
        root = Path(template.rootfs)
        image = cls.at(root)
        missing = [p.name for p in (image.kernel, image.initrd, image.disk) if not p.is_file()]
        if missing:
            raise SubstrateError(
                f"template {template.name} has no VM image ({', '.join(missing)} missing in "
                f"{root}); rebuild it with `coppice template build {template.name} --force`"
            )
        return image


@dataclass(frozen=True)
class Golden:
    version: int
    template: str
    key: str
    ram_file: str
    device_state: str
    #: the golden's writable disk as saved, the read-only backing of every clone's disk
    writable_disk: str
    writable_seed: str
    memory_mb: int
    disk_mb: int
    accel: str
    image: str
    boot_seconds: float
    created_at: float

    def usable_for(self, image_root: str, limits: Limits, accel: str) -> bool:
        return (
            self.version == META_VERSION
            and self.image == image_root
            and self.memory_mb == limits.memory_mb
            and self.disk_mb == limits.disk_mb
            and self.accel == accel
            and Path(self.device_state).is_file()
            and Path(self.writable_disk).is_file()
            and Path(self.writable_seed).is_file()
            and _size(Path(self.ram_file)) == limits.memory_mb * 1024 * 1024
        )


def golden_key(template: TemplateRecord) -> str:
    return f"{template.name}-{template.recipe_hash[:12]}"


def wait_for_migration(qmp: QmpChannel, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while True:
        status = qmp.execute("query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise SubstrateError(f"QEMU migration {status}")
        if time.monotonic() > deadline:
            raise SubstrateError(f"QEMU migration still {status} after {timeout_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


class GoldenSnapshots:
    def __init__(self, settings: Settings, taps: TapDevices) -> None:
        self.settings = settings
        self.taps = taps
        self.root = settings.state_dir / "vm-golden"
        self.run_root = settings.run_dir / "vm-golden"

    def ram_file(self, key: str) -> Path:
        return SHM_DIR / f"{self.settings.namespace}-vm-{key}.ram"

    @property
    def tap_name(self) -> str:
        digest = hashlib.sha256(self.settings.namespace.encode()).hexdigest()
        return f"{GOLDEN_PREFIX}{digest[:8]}"

    @property
    def boot_timeout_s(self) -> float:
        # Under TCG a guest boots and warms its Python kernel in tens of seconds, several
        # times the per-entry readiness timeout that clones (already warm) need.
        return max(300.0, 10 * self.settings.ready_timeout_s)

    def find(self, template: TemplateRecord) -> Golden | None:
        try:
            data = json.loads((self.root / golden_key(template) / "meta.json").read_text())
            return Golden(**data)
        except (OSError, ValueError, TypeError):
            return None

    def ensure(self, template: TemplateRecord, limits: Limits, accel: str) -> Golden:
        """The usable golden snapshot of this template version, booting it the first time."""
        image = VmImage.of(template)
        found = self.find(template)
        if found is not None and found.usable_for(template.rootfs, limits, accel):
            return found
        with self._locked():
            found = self.find(template)
            if found is not None and found.usable_for(template.rootfs, limits, accel):
                return found
            return self._build(template, image, limits, accel)

    def remove(self, template_name: str) -> None:
        """Delete every golden snapshot of a template (all its versions)."""
        with self._locked():
            self._remove_versions(template_name, keep=None)

    def _remove_versions(self, template_name: str, keep: str | None) -> None:
        """Every version of the template's golden but `keep`. Clones of a removed version
        run on: each has its RAM file mapped and its disk's backing open; snapshots and
        suspended VMs hold copies of their own."""
        pattern = re.compile(rf"^{re.escape(template_name)}-[0-9a-f]{{12}}$")
        if self.root.is_dir():
            for d in self.root.iterdir():
                if pattern.match(d.name) and d.name != keep:
                    self.ram_file(d.name).unlink(missing_ok=True)
                    shutil.rmtree(d, ignore_errors=True)
        prefix = f"{self.settings.namespace}-vm-"
        for f in SHM_DIR.glob(f"{prefix}*.ram"):
            key = f.name[len(prefix) : -len(".ram")]
            if pattern.match(key) and key != keep:
                f.unlink(missing_ok=True)

    def keys(self) -> set[str]:
        return {d.name for d in self.root.iterdir() if d.is_dir()} if self.root.is_dir() else set()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # One lock for all templates: a golden VM uses the reserved address and golden tap,
        # and two concurrent TCG boots would only slow each other down.
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _build(
        self, template: TemplateRecord, image: VmImage, limits: Limits, accel: str
    ) -> Golden:
        key = golden_key(template)
        final = self.root / key
        work = self.root / f".{key}.tmp-{os.getpid()}"
        run = self.run_root / key
        ram = self.ram_file(key)
        self._end_orphaned_boots()
        for stale in (work, run):
            shutil.rmtree(stale, ignore_errors=True)
        work.mkdir(parents=True)
        run.mkdir(parents=True)
        ram.unlink(missing_ok=True)
        ok = False
        try:
            disk_bytes = writable_disk_bytes(limits.disk_mb)
            make_golden_disk(work / WRITABLE, disk_bytes)
            boot_seconds = self._boot_with_retry(template, image, limits, accel, run, ram, work)
            # From here on the golden's disk is what every clone's disk reads through to.
            (work / WRITABLE).chmod(0o444)
            make_seed(final / WRITABLE, work / WRITABLE_SEED, disk_bytes)
            meta = Golden(
                version=META_VERSION,
                template=template.name,
                key=key,
                ram_file=str(ram),
                device_state=str(final / "device.state"),
                writable_disk=str(final / WRITABLE),
                writable_seed=str(final / WRITABLE_SEED),
                memory_mb=limits.memory_mb,
                disk_mb=limits.disk_mb,
                accel=accel,
                image=template.rootfs,
                boot_seconds=round(boot_seconds, 3),
                created_at=time.time(),
            )
            (work / "meta.json").write_text(json.dumps(asdict(meta), indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
            ok = True
            # A rebuilt template's older goldens would otherwise hold their RAM in /dev/shm
            # (memory_mb each) until the template is removed.
            self._remove_versions(template.name, keep=key)
            return meta
        finally:
            shutil.rmtree(run, ignore_errors=True)
            if not ok:
                shutil.rmtree(work, ignore_errors=True)
                ram.unlink(missing_ok=True)
            if self.run_root.is_dir() and not any(self.run_root.iterdir()):
                self.run_root.rmdir()

    def end_orphaned_boots(self) -> None:
        """End golden boots whose builder died, unless a boot is under way now (its lock
        is held): a gateway stopped mid-boot leaves its QEMU running, holding the golden
        tap and address."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            try:
                self._end_orphaned_boots()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _end_orphaned_boots(self) -> None:
        # Under the lock no boot is in progress: a QEMU still using the goldens' run
        # directory is one whose builder died.
        for ident, _ in qemu_process.processes_under(self.run_root).values():
            log.warning("ending golden boot %d left by a builder that died", ident.pid)
            qemu_process.kill_and_wait(ident, None)

    def _boot_with_retry(
        self,
        template: TemplateRecord,
        image: VmImage,
        limits: Limits,
        accel: str,
        run: Path,
        ram: Path,
        work: Path,
    ) -> float:
        # An emulated boot can wedge early (a lost timer tick); a second boot costs less
        # than failing every spawn of the template until someone looks.
        tsc_khz: int | None = None
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                return self._boot_and_save(template, image, limits, accel, run, ram, work, tsc_khz)
            except SubstrateError as exc:
                if attempt == BOOT_ATTEMPTS:
                    raise
                log.warning(
                    "golden VM of %s failed to boot (%s); booting again", template.name, exc
                )
                if PIT_CALIBRATION_FAILED in _read(run / "console.log"):
                    tsc_khz = tsc_khz_from_cpuinfo(_read(Path("/proc/cpuinfo")).decode())
                shutil.copyfile(run / "console.log", work / f"console-failed-{attempt}.log")
                for leftover in ("console.log", "qemu.log", "qmp.sock", "identity.sock"):
                    (run / leftover).unlink(missing_ok=True)
                make_golden_disk(work / WRITABLE, writable_disk_bytes(limits.disk_mb))
                ram.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def _boot_and_save(
        self,
        template: TemplateRecord,
        image: VmImage,
        limits: Limits,
        accel: str,
        run: Path,
        ram: Path,
        work: Path,
        tsc_khz: int | None,
    ) -> float:
        net = self.settings.vm_network
        ip = str(net.network.network_address + 2)
        tap = self.tap_name
        spec = MachineSpec(
            accel=accel,
            memory_mb=limits.memory_mb,
            kernel=image.kernel,
            initrd=image.initrd,
            root_disk=image.disk,
            writable_disk=work / WRITABLE,
            writable_format="raw",
            tap=tap,
            mac=mac_for(ip),
            ram_file=ram,
            share_ram=True,
            console_log=run / "console.log",
            qmp_socket=run / "qmp.sock",
            identity_socket=run / "identity.sock",
            guest=GuestIdentity(
                f"{ip}/{net.prefixlen}", str(net.gateway), "golden", limits.disk_mb, "golden"
            ),
            incoming=False,
            tsc_khz=tsc_khz,
        )
        self.taps.create(tap)
        started = time.monotonic()
        proc = qemu_process.launch(qemu_argv(spec), run / "qemu.log")
        ident = ProcessIdentity.of(proc.pid)
        port: IdentityPort | None = None
        qmp: QmpChannel | None = None
        try:
            readiness.wait_until_answering(
                f"golden VM of {template.name}",
                ip,
                AGENT_PORT,
                SSH_PORT,
                self.boot_timeout_s,
                is_alive=lambda: _booting(proc, run / "console.log", started),
                diagnostics=lambda: _tail(run / "console.log", run / "qemu.log"),
            )
            boot_seconds = time.monotonic() - started
            # Stay connected across the snapshot (see identity_port), and make sure the
            # guest's identity thread has answered, so it sits in read() when RAM is frozen.
            port = IdentityPort.connect(str(spec.identity_socket))
            reply = port.request({"ping": True}, timeout_s=60)
            if not reply.get("ok"):
                raise SubstrateError(f"the golden VM's identity port answered {reply}")
            time.sleep(0.3)
            qmp = QmpChannel.connect(spec.qmp_socket)
            qmp.execute("stop")
            qmp.execute("migrate-set-capabilities", ignore_shared_capability())
            qmp.execute("migrate", {"uri": save_uri(work / "device.state")})
            wait_for_migration(qmp, timeout_s=60)
            shutil.copyfile(run / "console.log", work / "console.log")
            return boot_seconds
        finally:
            if qmp is not None:
                qmp.close()
            if port is not None:
                port.close()
            if ident is not None:
                qemu_process.kill_and_wait(ident, proc)
            else:
                proc.wait(timeout=10)
            self.taps.remove(tap)


def _booting(proc: subprocess.Popen[bytes], console: Path, started: float) -> bool:
    """Still alive, or raise when the kernel never got to the initramfs."""
    if proc.poll() is not None:
        return False
    if time.monotonic() - started > BOOT_STALL_S:
        try:
            reached_init = INIT_MARKER in console.read_bytes()
        except OSError:
            reached_init = False
        if not reached_init:
            raise SubstrateError(
                f"the golden VM's kernel stalled before starting /init ({BOOT_STALL_S:.0f} s); "
                f"{_tail(console)}"
            )
    return True


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _tail(*paths: Path, lines: int = 5) -> str:
    parts = []
    for path in paths:
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            continue
        if text:
            parts.append(f"{path.name}: " + " | ".join(text.splitlines()[-lines:]))
    return "; ".join(parts) or "no console output"
