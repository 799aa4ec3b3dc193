"""The `vm` substrate: QEMU microVMs, each a copy-on-write clone of a warm golden snapshot.

Per entry, on the host:
  /var/lib/coppice/vm-disks/<id>.qcow2 its writable disk (vm_disk): the upper layer of the
                                       guest's overlay root, sized to the template's disk_mb,
                                       a qcow2 overlay on the golden's disk
  /run/coppice/vm/<id>/console.log     the guest's serial console
                      qemu.log         QEMU's own output
                      qmp.sock         QEMU's monitor (pause = stop, resume = cont)
                      identity.sock    the virtio-serial port its new identity goes through
  tap ctap<id>                         an isolated port of the vm bridge (coppbr0)
  one qemu-system-x86_64 process       RAM: a private mapping of the golden RAM file

spawn restores a clone (`-incoming defer`, then `migrate-incoming` of the golden's device
state), resumes it and hands it its own address, MAC, hostname, clock, random seed and SSH
host key; the golden's are inside the snapshot.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coppice.config import Limits, NetworkSettings, Settings
from coppice.errors import (
    NotSupportedOnSubstrate,
    PrerequisiteMissing,
    SandboxDied,
    SubstrateError,
)
from coppice.host.processes import ProcessIdentity
from coppice.images.keys import generate_ed25519
from coppice.net.egress_table import SandboxEgress
from coppice.net.tap import TapDevices, entry_tap_name
from coppice.resource_usage import ResourceUsage
from coppice.store.ipam import mac_for
from coppice.store.records import TemplateRecord
from coppice.substrates import accel, qemu_process, readiness, vm_saved_state
from coppice.substrates.base import (
    AGENT_PORT,
    SSH_PORT,
    Handle,
    HeadProcess,
    HostObjects,
    Persistence,
    SnapshotArtifact,
    SpawnSpec,
)
from coppice.substrates.children import Children
from coppice.substrates.golden import (
    Golden,
    GoldenSnapshots,
    VmImage,
    golden_key,
    wait_for_migration,
)
from coppice.substrates.identity_port import IdentityPort, fresh_seed, identity_message
from coppice.substrates.prerequisites import require_root, require_tools
from coppice.substrates.qemu_cmdline import (
    OWN_RAM_MAPPING,
    GuestIdentity,
    MachineSpec,
    ignore_shared_capability,
    load_uri,
    qemu_argv,
)
from coppice.substrates.qmp_channel import QmpChannel
from coppice.substrates.snapshots_not_yet import files_only_pause_refused
from coppice.substrates.teardown import Teardown, rmtree_if_exists
from coppice.substrates.vm_disk import (
    WritableDisks,
    allocated_bytes,
    copy_disk,
    writable_disk_bytes,
)
from coppice.substrates.vm_usage import read_usage, saved_memory_bound

REQUIRED_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
}
#: how long a restored clone may take to apply its identity (TCG guests are slow)
IDENTITY_TIMEOUT_S = 30.0
#: how long a ready guest may finish its background work before it is paused into the pool
SETTLE_TIMEOUT_S = 5.0
#: TCG translation cache per clone (QEMU flushes it whole when full). A warm clone has
#: translated ~40 MB by the time it is paused, most of its private memory; at 32 MB the
#: cache was flushed during warm-up and the first answer after checkout took 40-60 ms
#: instead of ~9 ms. 64 MB bounds what a busy checked-out clone can grow to.
TB_SIZE_MB = 64


#: what a vm snapshot's directory holds
SNAPSHOT_MEMORY, SNAPSHOT_DISK, SNAPSHOT_BASE = "memory.state", "disk.qcow2", "base.raw"


class VmSubstrate:
    name = "vm"
    #: a VM's memory and devices go to a file (as the golden snapshot's do), which a host
    #: reboot leaves on disk
    persistence = Persistence(
        memory_in_snapshots=True, memory_pause_survives_reboot=True, files_only_pause=False
    )

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.taps = TapDevices(settings.vm_network)
        self.egress = SandboxEgress(settings, settings.vm_network)
        self.goldens = GoldenSnapshots(settings, self.taps)
        # On the host's disk, not /run: what a sandbox writes must not cost host RAM.
        self.disks = WritableDisks(settings.state_dir / "vm-disks")
        self._accel: accel.AccelChoice | None = None
        self._children = Children()

    @property
    def network(self) -> NetworkSettings:
        return self.settings.vm_network

    @property
    def spawn_parallelism(self) -> int:
        # Under TCG a restoring clone keeps a CPU busy: more at once miss their deadline.
        return min(self.settings.spawn_parallelism, self.settings.vm_spawn_parallelism)

    @property
    def vm_dir(self) -> Path:
        return self.settings.run_dir / "vm"

    def entry_dir(self, entry_id: str) -> Path:
        return self.vm_dir / entry_id

    @property
    def accel(self) -> str:
        if self._accel is None:
            self._accel = accel.choose(self.settings.state_dir)
        return self._accel.accel

    # -- host --------------------------------------------------------------------------------

    def check_prerequisites(self) -> None:
        require_root(self.name)
        require_tools(REQUIRED_TOOLS)
        if not Path("/dev/net/tun").exists():
            raise PrerequisiteMissing(
                "/dev/net/tun is missing, so VMs get no network; the host kernel needs TUN"
            )

    def prepare_host(self) -> None:
        self.check_prerequisites()
        self.taps.bridge.ensure()
        self.egress.ensure()
        self.vm_dir.mkdir(parents=True, exist_ok=True)
        self.disks.root.mkdir(parents=True, exist_ok=True)
        self.goldens.end_orphaned_boots()

    def teardown_host(self) -> None:
        self.egress.remove()
        self.taps.bridge.remove()
        self.disks.remove_root_if_empty()
        suspended = self.suspended_dir
        if suspended.is_dir() and not any(suspended.iterdir()):
            suspended.rmdir()
        for d in (self.vm_dir, self.settings.run_dir):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()

    def forget_template(self, template_name: str) -> None:
        """Delete a template's golden snapshots (the template itself was removed)."""
        self.goldens.remove(template_name)

    def golden(self, template: TemplateRecord, limits: Limits) -> Golden:
        """The template's golden snapshot, booting it if needed (also a way to pre-build it)."""
        return self.goldens.ensure(template, limits, self.accel)

    # -- one entry ----------------------------------------------------------------------------

    def spawn(self, spec: SpawnSpec) -> Handle:
        golden = self.golden(spec.template, spec.limits)
        image = VmImage.of(spec.template)
        started = time.monotonic()
        self._make_entry_dir(spec.entry_id)
        disk = self.disks.create(spec.entry_id, Path(golden.writable_seed))
        machine, proc = self._launch(
            spec, image, golden.accel, golden.memory_mb, disk, Path(golden.ram_file)
        )
        own: dict[str, Any] = self._own(spec, machine, proc) | {
            "golden": golden_key(spec.template),
            "disk_bytes": writable_disk_bytes(golden.disk_mb),
            "disk_backing": golden.writable_disk,
            "ram_file": golden.ram_file,
        }

        def load_golden(qmp: QmpChannel) -> None:
            qmp.execute("migrate-set-capabilities", ignore_shared_capability())
            qmp.execute("migrate-incoming", {"uri": load_uri(Path(golden.device_state))})
            wait_for_migration(qmp, timeout_s=60)

        return self._bring_up(spec, machine, proc, own, started, load_golden)

    def _make_entry_dir(self, entry_id: str) -> Path:
        entry_dir = self.entry_dir(entry_id)
        entry_dir.mkdir(parents=True, exist_ok=False)
        return entry_dir

    def _launch(
        self,
        spec: SpawnSpec,
        image: VmImage,
        accel_name: str,
        memory_mb: int,
        disk: Path,
        ram_file: Path | None,
    ) -> tuple[MachineSpec, subprocess.Popen[bytes]]:
        """Start the entry's QEMU on its disk and tap, waiting for a state to load."""
        entry_dir = self.entry_dir(spec.entry_id)
        tap = entry_tap_name(spec.entry_id)
        self.taps.create(tap)
        net = self.settings.vm_network
        machine = MachineSpec(
            accel=accel_name,
            memory_mb=memory_mb,
            kernel=image.kernel,
            initrd=image.initrd,
            root_disk=image.disk,
            writable_disk=disk,
            writable_format="qcow2",
            tap=tap,
            mac=mac_for(spec.ip),
            ram_file=ram_file,
            share_ram=False,
            console_log=entry_dir / "console.log",
            qmp_socket=entry_dir / "qmp.sock",
            identity_socket=entry_dir / "identity.sock",
            guest=GuestIdentity(
                f"{spec.ip}/{net.prefixlen}",
                str(net.gateway),
                spec.hostname,
                spec.limits.disk_mb,
                spec.entry_id,
            ),
            incoming=True,
            tb_size_mb=TB_SIZE_MB,
        )
        proc = qemu_process.launch(qemu_argv(machine), entry_dir / "qemu.log")
        self._children.add(spec.entry_id, proc)
        return machine, proc

    def _own(
        self, spec: SpawnSpec, machine: MachineSpec, proc: subprocess.Popen[bytes]
    ) -> dict[str, Any]:
        return {
            "ip": spec.ip,
            "mac": machine.mac,
            "tap": machine.tap,
            "entry_dir": str(self.entry_dir(spec.entry_id)),
            "disk": str(machine.writable_disk),
            "memory_mb": machine.memory_mb,
            "accel": machine.accel,
            "image": spec.template.rootfs,
        }

    def _bring_up(
        self,
        spec: SpawnSpec,
        machine: MachineSpec,
        proc: subprocess.Popen[bytes],
        own: dict[str, Any],
        started: float,
        load: Callable[[QmpChannel], None],
    ) -> Handle:
        """Load a state into the waiting QEMU, run it and hand it the entry's identity."""
        ident = ProcessIdentity.of(proc.pid)
        message = self._identity_message(spec, machine.mac)
        try:
            restored = self._restore(spec.entry_id, machine, load, message)
        except SubstrateError as exc:
            raise SubstrateError(
                f"restoring entry {spec.entry_id} failed: {exc}; {self.console_tail(spec.entry_id)}"
            ) from exc
        own["restore_ms"] = round((restored - started) * 1000, 1)
        own["identity_ms"] = round((time.monotonic() - restored) * 1000, 1)
        head = HeadProcess(proc.pid, ident.start_time) if ident else None
        return Handle(head=head, detail=machine.accel, driver=own)

    def _identity_message(self, spec: SpawnSpec, mac: str) -> dict[str, Any]:
        net = self.settings.vm_network
        return identity_message(
            ip=spec.ip,
            prefixlen=net.prefixlen,
            gateway=str(net.gateway),
            mac=mac,
            hostname=spec.hostname,
            entry_id=spec.entry_id,
            ssh_host_key=generate_ed25519(f"root@{spec.hostname}").private_openssh,
            now=0.0,
            seed=fresh_seed(),
        )

    def _restore(
        self,
        entry_id: str,
        machine: MachineSpec,
        load: Callable[[QmpChannel], None],
        message: dict[str, Any],
    ) -> float:
        """Load a saved state into the waiting QEMU, run it, hand it its identity; returns
        when the guest has run (monotonic time), before it has applied the identity."""
        # Connected before the guest runs: see identity_port for why.
        port = IdentityPort.connect(str(machine.identity_socket))
        qmp = QmpChannel.connect(self.entry_dir(entry_id) / "qmp.sock", timeout_s=10)
        try:
            load(qmp)
            qmp.execute("cont")
            restored = time.monotonic()
            reply = port.request(message | {"time": time.time()}, timeout_s=IDENTITY_TIMEOUT_S)
        finally:
            qmp.close()
            port.close()
        if not reply.get("ok"):
            raise SubstrateError(f"the guest refused its identity: {reply.get('error', reply)}")
        return restored

    def wait_ready(self, spec: SpawnSpec, handle: Handle, timeout_s: float) -> None:
        readiness.wait_until_answering(
            spec.entry_id,
            spec.ip,
            AGENT_PORT,
            SSH_PORT,
            timeout_s,
            is_alive=lambda: self.is_alive(spec.entry_id, handle),
            diagnostics=lambda: self.console_tail(spec.entry_id),
        )

    def usage(self, entry_id: str, handle: Handle | None) -> ResourceUsage | None:
        """Read from the host side, without asking the guest: see vm_usage for what each
        number is."""
        if handle is None or handle.head is None or not handle.head.identity.is_running():
            return None
        own = handle.driver
        if "disk" not in own:
            return None  # spawned before entries had a disk of their own
        return read_usage(
            pid=handle.head.pid,
            ram_file=Path(str(own["ram_file"])),
            memory_bytes=int(own["memory_mb"]) * 2**20,
            disk=Path(str(own["disk"])),
            disk_backing=Path(str(own["disk_backing"])),
            disk_bytes=int(own["disk_bytes"]),
        )

    # -- snapshots and forks -----------------------------------------------------------------

    def footprint(self, entry_id: str, handle: Handle | None, keep_memory: bool) -> int:
        """The entry's disk (its overlay and what it reads through to) plus, with memory,
        a bound of what its saved memory holds (see saved_memory_bound)."""
        own = self._own_of(entry_id, handle)
        disk = allocated_bytes(Path(own["disk"]))
        with contextlib.suppress(OSError):
            disk += allocated_bytes(Path(own["disk_backing"]))
        if not keep_memory:
            return disk
        assert handle is not None and handle.head is not None
        try:
            smaps = Path(f"/proc/{handle.head.pid}/smaps").read_text()
        except OSError as exc:
            raise SandboxDied(entry_id) from exc
        return disk + saved_memory_bound(smaps, Path(str(own["ram_file"])))

    def snapshot(
        self, entry_id: str, handle: Handle | None, directory: Path, keep_memory: bool
    ) -> SnapshotArtifact:
        """Stop the guest (QEMU flushes its disk's caches to the file as it stops), save its
        memory and devices, copy its disk, run it again."""
        if not keep_memory:
            raise NotSupportedOnSubstrate(
                "a snapshot without memory",
                self.name,
                "its snapshots keep memory and files (the guest's unwritten page cache is "
                "only in its memory); ask with memory (mode='full')",
            )
        own = self._own_of(entry_id, handle)
        qmp = QmpChannel.connect(self.entry_dir(entry_id) / "qmp.sock", timeout_s=10)
        try:
            qmp.execute("stop")
            saved = vm_saved_state.save(qmp, directory / SNAPSHOT_MEMORY)
            disk_bytes = copy_disk(
                Path(own["disk"]),
                Path(own["disk_backing"]),
                directory / SNAPSHOT_DISK,
                directory / SNAPSHOT_BASE,
            )
        finally:
            # Running again whatever happened (after a migration `cont` also takes the
            # disks back, which the migration's end handed over).
            with contextlib.suppress(SubstrateError):
                qmp.execute("cont")
            qmp.close()
        return SnapshotArtifact(
            directory,
            True,
            saved.size_bytes + disk_bytes,
            {
                "memory": SNAPSHOT_MEMORY,
                "disk": SNAPSHOT_DISK,
                "base": SNAPSHOT_BASE,
                "memory_mb": int(own["memory_mb"]),
                "disk_bytes": int(own["disk_bytes"]),
                "accel": str(own.get("accel", self.accel)),
                "image": str(own.get("image", "")),
                "data_pages": saved.data_pages,
            },
        )

    def spawn_from_snapshot(self, spec: SpawnSpec, artifact: SnapshotArtifact) -> Handle:
        """A new VM running on in the snapshot's memory, with a copy of its disk and its own
        identity (handed over as a pool clone's is)."""
        drv = artifact.driver
        if not artifact.kept_memory or "memory" not in drv:
            raise NotSupportedOnSubstrate("a sandbox from a snapshot without memory", self.name)
        accel_name = str(drv["accel"])
        if accel_name != self.accel:
            raise SubstrateError(
                f"the snapshot was taken under {accel_name} and this host runs VMs under "
                f"{self.accel}; a VM's saved state loads only under the accelerator it was "
                "saved with, so take the snapshot again here"
            )
        image = self._image_of(spec, str(drv.get("image", "")))
        started = time.monotonic()
        self._make_entry_dir(spec.entry_id)
        d = artifact.directory
        disk, base = self.disks.create_from(
            spec.entry_id, d / str(drv["disk"]), d / str(drv["base"])
        )
        machine, proc = self._launch(spec, image, accel_name, int(drv["memory_mb"]), disk, None)
        own = self._own(spec, machine, proc) | {
            "disk_bytes": int(drv["disk_bytes"]),
            "disk_backing": str(base),
            "ram_file": OWN_RAM_MAPPING,
            "from_snapshot": str(d.name),
        }
        memory = d / str(drv["memory"])
        return self._bring_up(
            spec, machine, proc, own, started, lambda qmp: vm_saved_state.load(qmp, memory)
        )

    def _image_of(self, spec: SpawnSpec, recorded: str) -> VmImage:
        """The template image the saved state was running on: its page cache and mounts
        describe that image, not a rebuilt one."""
        if recorded and recorded != spec.template.rootfs:
            image = VmImage.at(Path(recorded))
            if image.disk.is_file():
                return image
            raise SubstrateError(
                f"template {spec.template.name} was rebuilt since this snapshot was taken, "
                "and the image it ran on is gone; a VM's memory only resumes on the image it "
                "was saved on, so take the snapshot again from a sandbox of the new template"
            )
        return VmImage.of(spec.template)

    def stop_processes(self, entry_id: str, handle: Handle | None) -> None:
        raise files_only_pause_refused(self.name)

    def start_processes(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        raise NotSupportedOnSubstrate("resuming a files-only pause", self.name)

    def has_files(self, entry_id: str, handle: Handle | None) -> bool:
        return self.disks.path(entry_id).exists()

    def end_capture(self, entry_id: str, handle: Handle | None) -> None:
        # A capture stops the guest; a gateway that died during one left it stopped.
        self.resume(entry_id, handle)

    def delete_snapshot(self, directory: Path) -> None:
        rmtree_if_exists(directory)

    def _own_of(self, entry_id: str, handle: Handle | None) -> dict[str, Any]:
        if handle is None or not self.is_alive(entry_id, handle):
            raise SandboxDied(entry_id)
        own = handle.driver
        if "disk" not in own:
            raise SubstrateError(
                f"entry {entry_id} was started before VMs had disks of their own; start a "
                "new sandbox to snapshot it"
            )
        return own

    def console_log(self, entry_id: str) -> Path:
        return self.entry_dir(entry_id) / "console.log"

    def console_tail(self, entry_id: str, lines: int = 5) -> str:
        parts = []
        for name in ("console.log", "qemu.log"):
            try:
                text = (self.entry_dir(entry_id) / name).read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"{name}: " + " | ".join(text.splitlines()[-lines:]))
        return "; ".join(parts) or "no console output"

    def pause(self, entry_id: str, handle: Handle | None) -> None:
        # Only a warm entry going into the pool is paused: it settles first, so that the
        # first request after its checkout does not wait behind its start-up's last work.
        # A sandbox handed straight out (a cold start, a fork) never waits for this.
        if handle is not None and handle.head is not None:
            qemu_process.wait_until_idle(handle.head.pid, timeout_s=SETTLE_TIMEOUT_S)
        self._execute(entry_id, "stop")

    @property
    def suspended_dir(self) -> Path:
        """Suspended entries' memory and devices: on the host's disk, so a reboot leaves them."""
        return self.settings.state_dir / "vm-suspended"

    def saved_state(self, entry_id: str) -> Path:
        return self.suspended_dir / f"{entry_id}.state"

    def suspend(self, entry_id: str, handle: Handle | None) -> Handle:
        """Memory and devices to disk, the disk made independent of the golden's (a reboot
        rebuilds that), QEMU and its tap gone: a suspended VM costs the host disk only."""
        own = self._own_of(entry_id, handle)
        assert handle is not None
        target = self.saved_state(entry_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a suspension cut short before
        qmp = QmpChannel.connect(self.entry_dir(entry_id) / "qmp.sock", timeout_s=10)
        try:
            qmp.execute("stop")
            try:
                saved = vm_saved_state.save(qmp, target)
                backing = self.disks.make_own(entry_id, Path(str(own["disk_backing"])))
            except BaseException:
                target.unlink(missing_ok=True)
                with contextlib.suppress(SubstrateError):
                    qmp.execute("cont")
                raise
        finally:
            qmp.close()
        self._end_processes(entry_id, handle)
        kept = own | {
            "disk_backing": str(backing),
            "suspended": str(target),
            "suspended_bytes": saved.size_bytes,
            "suspended_data_pages": saved.data_pages,
        }
        return Handle(head=None, detail=handle.detail, driver=kept)

    def wake(self, spec: SpawnSpec, handle: Handle | None) -> Handle:
        if handle is None or "suspended" not in handle.driver:
            # Suspended by a gateway before VMs wrote their memory to disk: a freeze.
            self.resume(spec.entry_id, handle)
            assert handle is not None
            return handle
        own = dict(handle.driver)
        state = Path(str(own.pop("suspended")))
        own.pop("suspended_bytes", None)
        own.pop("suspended_data_pages", None)
        if not state.is_file():
            raise SandboxDied(spec.entry_id, "its saved memory is gone")
        image = self._image_of(spec, str(own.get("image", "")))
        started = time.monotonic()
        entry_dir = self.entry_dir(spec.entry_id)
        rmtree_if_exists(entry_dir)  # what a reboot or a crash left
        self.taps.remove(entry_tap_name(spec.entry_id))
        self._make_entry_dir(spec.entry_id)
        machine, proc = self._launch(
            spec,
            image,
            str(own.get("accel", self.accel)),
            int(own["memory_mb"]),
            Path(str(own["disk"])),
            None,
        )
        own["ram_file"] = OWN_RAM_MAPPING
        woken = self._bring_up(
            spec, machine, proc, own, started, lambda qmp: vm_saved_state.load(qmp, state)
        )
        state.unlink(missing_ok=True)
        return woken

    def resume(self, entry_id: str, handle: Handle | None) -> None:
        # Every resume is of a sandbox someone uses: full CPU priority from here on.
        if handle is not None and handle.head is not None:
            qemu_process.serve_at_full_priority(handle.head.pid)
        self._execute(entry_id, "cont")

    def agent_address(self, handle: Handle) -> tuple[str, int]:
        return str(handle.driver["ip"]), AGENT_PORT

    def _execute(self, entry_id: str, command: str) -> None:
        # One connection per command, closed at once: QEMU's monitor serves one client at a
        # time, and any process (the gateway, a CLI beside it, the next gateway) must be able
        # to pause or resume the entry. It costs about a millisecond of negotiation.
        channel = QmpChannel.connect(self.entry_dir(entry_id) / "qmp.sock", timeout_s=10)
        try:
            channel.execute(command)
        finally:
            channel.close()

    def is_alive(self, entry_id: str, handle: Handle | None) -> bool:
        # Memory on disk is a live sandbox without a QEMU. A suspension writes it before its
        # QEMU ends, and a wake removes it once the new QEMU runs, but the handle that says
        # which is stored only after either: the file and our own running child answer for
        # those moments (the keeper had buried a sandbox seen between the two).
        if self.saved_state(entry_id).is_file():
            return True
        child = self._children.get(entry_id)
        if child is not None and child.poll() is None:
            return True
        return self._children.head_alive(entry_id, handle)

    def destroy(self, entry_id: str, handle: Handle | None) -> None:
        teardown = Teardown(entry_id)
        entry_dir = self.entry_dir(entry_id)
        self._kill_processes(teardown, entry_id, handle)
        teardown.attempt("remove tap", lambda: self.taps.remove(entry_tap_name(entry_id)))
        teardown.attempt("remove disk", lambda: self.disks.remove(entry_id))
        teardown.attempt(
            "remove saved state", lambda: self.saved_state(entry_id).unlink(missing_ok=True)
        )
        teardown.attempt("remove directory", lambda: rmtree_if_exists(entry_dir))
        teardown.finish()

    def _end_processes(self, entry_id: str, handle: Handle | None) -> None:
        """QEMU, its tap and its run directory go; its disk and saved state stay."""
        teardown = Teardown(entry_id)
        self._kill_processes(teardown, entry_id, handle)
        teardown.attempt("remove tap", lambda: self.taps.remove(entry_tap_name(entry_id)))
        teardown.attempt("remove directory", lambda: rmtree_if_exists(self.entry_dir(entry_id)))
        teardown.finish()

    def _kill_processes(self, teardown: Teardown, entry_id: str, handle: Handle | None) -> None:
        entry_dir = self.entry_dir(entry_id)
        child = self._children.pop(entry_id)
        victims = {
            pid: ident for pid, (ident, _) in qemu_process.processes_under(entry_dir).items()
        }
        if handle is not None and handle.head is not None:
            victims.setdefault(handle.head.pid, handle.head.identity)
        if child is not None:
            own = ProcessIdentity.of(child.pid)
            if own is not None:
                victims.setdefault(child.pid, own)
            else:
                teardown.attempt("reap", lambda: _reap(child))
        for ident in victims.values():
            mine = child if child is not None and child.pid == ident.pid else None
            teardown.attempt(
                f"kill qemu {ident.pid}",
                functools.partial(qemu_process.kill_and_wait, ident, mine),
            )

    def host_objects(self) -> HostObjects:
        dirs = {p.name for p in self.vm_dir.iterdir()} if self.vm_dir.is_dir() else set()
        processes = {name for _, name in qemu_process.processes_under(self.vm_dir).values()}
        return HostObjects(
            {
                "processes": processes,
                "taps": self.taps.entry_ids(),
                "directories": dirs,
                "qmp_sockets": {d for d in dirs if (self.entry_dir(d) / "qmp.sock").exists()},
                "disks": self.disks.entry_ids(),
                "saved_states": _state_ids(self.suspended_dir),
            }
        )


def _state_ids(directory: Path) -> set[str]:
    if not directory.is_dir():
        return set()
    return {p.name.split(".", 1)[0] for p in directory.iterdir()}


def _reap(child: subprocess.Popen[bytes]) -> None:
    child.wait(timeout=10)
