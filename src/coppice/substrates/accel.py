"""Which accelerator QEMU runs guests on: KVM where it really boots a stock kernel, else TCG.

`/dev/kvm` existing is not enough. On PVM hosts (`kvm_pvm`, e.g. nested inside a Firecracker
VM) the device opens fine, but a Debian guest kernel hangs at its first exception, so those
hosts run TCG. The decision is a pure function of what the host shows; the probe that gathers
those facts runs once per state directory and its answer is kept in a small JSON file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("coppice.vm")

KVM = "kvm"
TCG = "tcg"
CACHE_NAME = "vm-accel.json"
#: bump when the probe learns something new, so old cached answers are not trusted
PROBE_VERSION = 1


@dataclass(frozen=True)
class HostFacts:
    cpu_flags: frozenset[str]
    kvm_device_usable: bool
    pvm_only: bool


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    reason: str


def decide(facts: HostFacts) -> AccelChoice:
    if not facts.kvm_device_usable:
        return AccelChoice(TCG, "/dev/kvm is missing or cannot be opened")
    if not facts.cpu_flags & {"vmx", "svm"}:
        if facts.pvm_only:
            return AccelChoice(
                TCG,
                "/dev/kvm is PVM (kvm_pvm), which cannot boot a stock Debian guest kernel",
            )
        return AccelChoice(TCG, "the CPU shows no vmx/svm flag, so /dev/kvm cannot run guests")
    return AccelChoice(KVM, "hardware virtualisation (vmx/svm) and a usable /dev/kvm")


def read_facts(
    cpuinfo: Path = Path("/proc/cpuinfo"),
    kvm_device: Path = Path("/dev/kvm"),
    modules: Path = Path("/sys/module"),
) -> HostFacts:
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.partition(":")[2].split())
    except OSError:
        pass
    try:
        fd = os.open(kvm_device, os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
        usable = True
    except OSError:
        usable = False
    # PVM-only: the PVM module is there and neither hardware backend is.
    pvm = (modules / "kvm_pvm").exists() and not any(
        (modules / m).exists() for m in ("kvm_intel", "kvm_amd")
    )
    return HostFacts(frozenset(flags & {"vmx", "svm"}), usable, pvm)


def choose(state_dir: Path) -> AccelChoice:
    """The remembered answer for this host, probing (and warning about TCG) the first time."""
    cache = state_dir / CACHE_NAME
    try:
        data = json.loads(cache.read_text())
        if data.get("version") == PROBE_VERSION and data.get("accel") in (KVM, TCG):
            return AccelChoice(str(data["accel"]), str(data.get("reason", "")))
    except (OSError, ValueError):
        pass
    facts = read_facts()
    choice = decide(facts)
    if choice.accel == TCG:
        log.warning(
            "vm substrate: running guests under TCG (software emulation, ~10x slower): %s",
            choice.reason,
        )
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"version": PROBE_VERSION, **asdict(choice)}) + "\n")
        tmp.replace(cache)
    except OSError:
        pass  # an unwritable state dir only means probing again next time
    return choice
