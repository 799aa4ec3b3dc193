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

import functools
import subprocess
import time
from pathlib import Path
from typing import Any

from coppice.config import Limits, NetworkSettings, Settings
from coppice.errors import PrerequisiteMissing, SubstrateError
from coppice.host.processes import ProcessIdentity
from coppice.images.keys import generate_ed25519
from coppice.net.egress_table import SandboxEgress
from coppice.net.tap import TapDevices, entry_tap_name
from coppice.resource_usage import ResourceUsage
from coppice.store.ipam import mac_for
from coppice.store.records import TemplateRecord
from coppice.substrates import accel, qemu_process, readiness
from coppice.substrates.base import (
    AGENT_PORT,
    SSH_PORT,
    Handle,
    HeadProcess,
    HostObjects,
    Persistence,
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
    GuestIdentity,
    MachineSpec,
    ignore_shared_capability,
    load_uri,
    qemu_argv,
)
from coppice.substrates.qmp_channel import QmpChannel
from coppice.substrates.snapshots_not_yet import SnapshotsNotYet
from coppice.substrates.teardown import Teardown, rmtree_if_exists
from coppice.substrates.vm_disk import WritableDisks, writable_disk_bytes
from coppice.substrates.vm_usage import read_usage

REQUIRED_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
}
#: how long a restored clone may take to apply its identity (TCG guests are slow)
IDENTITY_TIMEOUT_S = 30.0
#: how long wait_ready lets a ready guest finish its background work before it is paused
SETTLE_TIMEOUT_S = 5.0
#: TCG translation cache per clone (QEMU flushes it whole when full). A warm clone has
#: translated ~40 MB by the time it is paused, most of its private memory; at 32 MB the
#: cache was flushed during warm-up and the first answer after checkout took 40-60 ms
#: instead of ~9 ms. 64 MB bounds what a busy checked-out clone can grow to.
TB_SIZE_MB = 64


class VmSubstrate(SnapshotsNotYet):
    name = "vm"
    #: a VM's memory and devices go to a file (as the golden snapshot's do), which a host
    #: reboot leaves on disk
    persistence = Persistence(memory_in_snapshots=True, memory_pause_survives_reboot=True)

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

    def teardown_host(self) -> None:
        self.egress.remove()
        self.taps.bridge.remove()
        self.disks.remove_root_if_empty()
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
        entry_dir = self.entry_dir(spec.entry_id)
        entry_dir.mkdir(parents=True, exist_ok=False)
        started = time.monotonic()
        disk = self.disks.create(spec.entry_id, Path(golden.writable_seed))
        tap = entry_tap_name(spec.entry_id)
        mac = mac_for(spec.ip)
        self.taps.create(tap)
        net = self.settings.vm_network
        machine = MachineSpec(
            accel=golden.accel,
            memory_mb=golden.memory_mb,
            kernel=image.kernel,
            initrd=image.initrd,
            root_disk=image.disk,
            writable_disk=disk,
            writable_format="qcow2",
            tap=tap,
            mac=mac,
            ram_file=Path(golden.ram_file),
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
        ident = ProcessIdentity.of(proc.pid)
        own: dict[str, Any] = {
            "ip": spec.ip,
            "mac": mac,
            "tap": tap,
            "entry_dir": str(entry_dir),
            "golden": golden_key(spec.template),
            "disk": str(disk),
            "disk_bytes": writable_disk_bytes(golden.disk_mb),
            "disk_backing": golden.writable_disk,
            "ram_file": golden.ram_file,
            "memory_mb": golden.memory_mb,
        }
        message = identity_message(
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
        try:
            restored = self._restore(spec.entry_id, machine, golden, message)
        except SubstrateError as exc:
            raise SubstrateError(
                f"restoring entry {spec.entry_id} failed: {exc}; {self.console_tail(spec.entry_id)}"
            ) from exc
        own["restore_ms"] = round((restored - started) * 1000, 1)
        own["identity_ms"] = round((time.monotonic() - restored) * 1000, 1)
        head = HeadProcess(proc.pid, ident.start_time) if ident else None
        return Handle(head=head, detail=golden.accel, driver=own)

    def _restore(
        self, entry_id: str, machine: MachineSpec, golden: Golden, message: dict[str, Any]
    ) -> float:
        """Load the golden state into the waiting QEMU, run it, hand it its identity; returns
        when the guest has run (monotonic time), before it has applied the identity."""
        # Connected before the guest runs: see identity_port for why.
        port = IdentityPort.connect(str(machine.identity_socket))
        qmp = QmpChannel.connect(self.entry_dir(entry_id) / "qmp.sock", timeout_s=10)
        try:
            qmp.execute("migrate-set-capabilities", ignore_shared_capability())
            qmp.execute("migrate-incoming", {"uri": load_uri(Path(golden.device_state))})
            wait_for_migration(qmp, timeout_s=60)
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
        if handle.head is not None:
            qemu_process.wait_until_idle(handle.head.pid, timeout_s=SETTLE_TIMEOUT_S)

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
        self._execute(entry_id, "stop")

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
        return self._children.head_alive(entry_id, handle)

    def destroy(self, entry_id: str, handle: Handle | None) -> None:
        teardown = Teardown(entry_id)
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
        teardown.attempt("remove tap", lambda: self.taps.remove(entry_tap_name(entry_id)))
        teardown.attempt("remove disk", lambda: self.disks.remove(entry_id))
        teardown.attempt("remove directory", lambda: rmtree_if_exists(entry_dir))
        teardown.finish()

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
            }
        )


def _reap(child: subprocess.Popen[bytes]) -> None:
    child.wait(timeout=10)
