"""What an instance owns on the host right now, to prove tests leave nothing behind."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: the bridges and links other test instances (COPPICE_TEST_INSTANCE) own
_INSTANCE_LINK = re.compile(r"coppt\d(br|vm)|coppinet\d|coppicetest0|copptestvm0")


def _links(own: tuple[str, ...]) -> set[str]:
    """Coppice-shaped links that are this instance's: its own bridges and links, what hangs
    off its bridges, and loose ones that no other instance's bridge names."""
    found = set()
    for line in subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        name = line.split(": ")[1].split("@")[0]
        if not name.startswith(("copp", "veth", "ctap", "cgold")):
            continue
        master = re.search(r" master (\S+)", line)
        if master is not None:
            if not own or master.group(1) in own:
                found.add(name)
        elif not own or name in own or not _INSTANCE_LINK.fullmatch(name):
            found.add(name)
    return found


@dataclass(frozen=True)
class HostSnapshot:
    mounts: frozenset[str]
    links: frozenset[str]
    netns: frozenset[str]
    cgroups: frozenset[str]
    processes: frozenset[str]
    #: jail entry disks: files in the instance's disks directory, and loop devices over them
    disk_images: frozenset[str] = frozenset()
    loops: frozenset[str] = frozenset()

    @classmethod
    def take(
        cls, namespace: str, bridges: tuple[str, ...] = (), disks_dir: Path | None = None
    ) -> HostSnapshot:
        """`bridges`: the instance's own; links of other test instances running beside it
        (on their own bridges) are theirs, not this one's leaks."""
        mounts = frozenset(
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if namespace in line.split()[1]
        )
        links = frozenset(_links(bridges))
        netns_dir = Path("/run/netns")
        netns = (
            frozenset(p.name for p in netns_dir.iterdir() if p.name.startswith(namespace))
            if netns_dir.is_dir()
            else frozenset()
        )
        cgroups = frozenset(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{namespace}*"))
        cgroups |= frozenset(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{namespace}/*"))
        procs = frozenset(
            line
            for line in subprocess.run(
                ["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            if f"/run/{namespace}/" in line
        )
        images: frozenset[str] = frozenset()
        loops: frozenset[str] = frozenset()
        if disks_dir is not None:
            if disks_dir.is_dir():
                images = frozenset(str(p) for p in disks_dir.rglob("*") if p.is_file())
            loops = frozenset(
                f"{device} {backing}" for device, backing in loop_devices_under(disks_dir)
            )
        return cls(mounts, links, netns, cgroups, procs, images, loops)

    def minus(self, before: HostSnapshot) -> dict[str, set[str]]:
        diff = {
            "mounts": set(self.mounts - before.mounts),
            "links": set(self.links - before.links),
            "netns": set(self.netns - before.netns),
            "cgroups": set(self.cgroups - before.cgroups),
            "processes": set(self.processes - before.processes),
            "disk images": set(self.disk_images - before.disk_images),
            "loop devices": set(self.loops - before.loops),
        }
        return {k: v for k, v in diff.items() if v}


def loop_devices_under(directory: Path) -> list[tuple[str, str]]:
    """(device, backing file) of every loop device whose file is (or was) in `directory`,
    as losetup lists them: read apart from the sysfs table the code under test uses."""
    listed = subprocess.run(
        ["losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = []
    for line in listed.splitlines():
        device, _, backing = line.partition(" ")
        if backing.startswith(f"{directory}/"):
            found.append((device, backing))
    return found
