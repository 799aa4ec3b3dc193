"""A VM clone's own identity, delivered by the host over a virtio-serial port after restore.

Every clone of a `vm` template wakes up from the same memory snapshot, so it starts with the
golden VM's address, MAC, hostname, clock, random state and SSH host key. The host writes one
JSON line per clone to the port named `coppice.identity`; this thread applies it and answers
`{"ok": true}` (or `{"ok": false, "error": ...}`). A `{"ping": true}` line is answered without
changing anything: the host uses it on the golden VM to know this thread is waiting in read()
when the snapshot is taken, so that a clone wakes on the first byte instead of a sleep.

Only VMs have the port (see `find_port`); jails never start this thread.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PORT_NAME = "coppice.identity"
VIRTIO_PORTS = Path("/sys/class/virtio-ports")
# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class IdentityError(ValueError):
    pass


@dataclass(frozen=True)
class Identity:
    ip: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    mac: str
    hostname: str
    entry_id: str
    time: float
    seed: bytes
    ssh_host_key: str

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Identity:
        try:
            ip = ipaddress.IPv4Interface(str(msg["ip"]))
            gateway = ipaddress.IPv4Address(str(msg["gateway"]))
            mac = str(msg["mac"]).lower()
            hostname = str(msg["hostname"])
            seed = bytes.fromhex(str(msg["seed"]))
            key = str(msg["ssh_host_key"])
            stamp = float(msg["time"])
            entry_id = str(msg.get("entry_id", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise IdentityError(f"malformed identity: {exc}") from exc
        if not _MAC.match(mac):
            raise IdentityError(f"not a MAC address: {mac!r}")
        if not _HOSTNAME.match(hostname):
            raise IdentityError(f"not a hostname: {hostname!r}")
        if "PRIVATE KEY" not in key:
            raise IdentityError("ssh_host_key is not an OpenSSH private key")
        if not seed:
            raise IdentityError("empty seed")
        return cls(ip, gateway, mac, hostname, entry_id, stamp, seed, key)


def network_script(identity: Identity, device: str = "eth0") -> str:
    """`ip -batch` input that moves the interface to the new MAC and address in one process
    (each exec costs tens of milliseconds of emulated CPU in a TCG guest)."""
    return (
        f"link set {device} down\n"
        f"link set {device} address {identity.mac}\n"
        f"addr flush dev {device}\n"
        f"addr add {identity.ip.with_prefixlen} dev {device}\n"
        f"link set {device} up\n"
        f"route replace default via {identity.gateway}\n"
    )


def hosts_file(identity: Identity) -> str:
    return f"127.0.0.1 localhost\n{identity.ip.ip} {identity.hostname}\n"


def instance_file(identity: Identity) -> str:
    return (
        f"COPPICE_ENTRY_ID={identity.entry_id}\n"
        f"COPPICE_IP={identity.ip.ip}\n"
        f"COPPICE_HOSTNAME={identity.hostname}\n"
    )


def find_port(ports: Path = VIRTIO_PORTS, dev: Path = Path("/dev")) -> Path | None:
    """The device node of the identity port, or None outside a VM."""
    if not ports.is_dir():
        return None
    for entry in sorted(ports.iterdir()):
        try:
            if (entry / "name").read_text().strip() == PORT_NAME:
                return dev / entry.name
        except OSError:
            continue
    return None


class IdentityApplier:
    """Applies an identity to the running guest. `root` is / in a VM, a scratch dir in tests.
    `on_applied` runs after each identity, before the host hears it was applied."""

    def __init__(
        self, root: Path = Path("/"), on_applied: Callable[[], None] | None = None
    ) -> None:
        self.root = root
        self.on_applied = on_applied

    def apply(self, identity: Identity) -> None:
        # Clock first: the snapshot's clock is stale, and everything after wants the real time.
        time.clock_settime(time.CLOCK_REALTIME, identity.time)
        self._reseed(identity.seed)
        self._network(identity)
        socket.sethostname(identity.hostname)
        self._write("etc/hostname", identity.hostname + "\n", 0o644)
        self._write("etc/hosts", hosts_file(identity), 0o644)
        self._write("etc/coppice-instance", instance_file(identity), 0o644)
        os.environ.update(
            COPPICE_ENTRY_ID=identity.entry_id,
            COPPICE_IP=str(identity.ip.ip),
            COPPICE_HOSTNAME=identity.hostname,
        )
        self._ssh_host_key(identity.ssh_host_key)
        if self.on_applied is not None:
            self.on_applied()

    def _reseed(self, seed: bytes) -> None:
        with open(self.root / "dev/urandom", "wb", buffering=0) as rnd:
            rnd.write(seed)
            # Credit the seed and force a reseed now: clones share the snapshot's CRNG state,
            # and without this their next random bytes would be identical until the kernel's
            # own reseed interval (a minute) passes.
            request = struct.pack("ii", len(seed) * 8, len(seed)) + seed
            fcntl.ioctl(rnd.fileno(), RNDADDENTROPY, request)
            fcntl.ioctl(rnd.fileno(), RNDRESEEDCRNG)

    def _network(self, identity: Identity) -> None:
        done = subprocess.run(
            ["ip", "-batch", "-"],
            input=network_script(identity),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise IdentityError(f"ip failed: {done.stderr.strip()}")

    def _ssh_host_key(self, private_key: str) -> None:
        path = self.root / "etc/ssh/ssh_host_ed25519_key"
        self._write(str(path.relative_to(self.root)), private_key.rstrip("\n") + "\n", 0o600)
        (self.root / "etc/ssh/ssh_host_ed25519_key.pub").unlink(missing_ok=True)
        if not listener_holds_host_keys(self.root):
            # Before OpenSSH 9.8 every connection re-executes sshd, which reads the host
            # keys from disk; restarting the listener would only cost emulated CPU time.
            return
        pid = sshd_listener_pid(self.root)
        if pid is not None:
            # sshd re-executes itself on SIGHUP and so loads the new key.
            os.kill(pid, signal.SIGHUP)

    def _write(self, rel: str, text: str, mode: int) -> None:
        path = self.root / rel
        tmp = path.with_name(f".{path.name}.coppice-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        tmp.replace(path)


def listener_holds_host_keys(root: Path = Path("/")) -> bool:
    """OpenSSH 9.8 split per-connection work into sshd-session, which gets the host keys
    from the listener; only then does a new key need the listener restarted."""
    return (root / "usr/lib/openssh/sshd-session").exists()


def sshd_listener_pid(root: Path = Path("/")) -> int | None:
    """The listening sshd: its pid file, else the sshd whose parent is not an sshd."""
    try:
        pid = int((root / "run/sshd.pid").read_text().strip())
        if _comm(root, pid) == "sshd":
            return pid
    except (OSError, ValueError):
        pass
    for proc in (root / "proc").iterdir() if (root / "proc").is_dir() else ():
        if not proc.name.isdigit() or _comm(root, int(proc.name)) != "sshd":
            continue
        try:
            stat = (proc / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
        if _comm(root, ppid) != "sshd":
            return int(proc.name)
    return None


def _comm(root: Path, pid: int) -> str:
    try:
        return (root / f"proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def answer(line: bytes, applier: IdentityApplier) -> dict[str, Any]:
    try:
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise IdentityError("identity must be a JSON object")
        if msg.get("ping"):
            return {"ok": True}
        applier.apply(Identity.from_message(msg))
        return {"ok": True}
    except (IdentityError, OSError, ValueError) as exc:
        log.error("identity not applied: %s", exc)
        return {"ok": False, "error": str(exc)}


def serve_port(path: Path, applier: IdentityApplier) -> None:
    """Read JSON lines from the port forever, answering each."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    pending = b""
    idle = 0.01
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            # No host on the other end: read() does not block then, so back off. The host
            # stays connected across the golden snapshot, so a clone is never asleep here.
            time.sleep(idle)
            idle = min(idle * 2, 0.5)
            continue
        idle = 0.01
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                reply = json.dumps(answer(line, applier)).encode() + b"\n"
                os.write(fd, reply)


def start(on_applied: Callable[[], None] | None = None) -> threading.Thread | None:
    """Start the identity thread when this is a VM with the identity port; else do nothing."""
    path = find_port()
    if path is None:
        return None
    thread = threading.Thread(
        target=_run, args=(path, on_applied), name="coppice-identity", daemon=True
    )
    thread.start()
    return thread


def _run(path: Path, on_applied: Callable[[], None] | None) -> None:
    try:
        serve_port(path, IdentityApplier(on_applied=on_applied))
    except OSError:
        log.exception("the identity port %s failed", path)
