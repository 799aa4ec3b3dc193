"""Experiment: a fork of a pre-imported Python (the template's zygote) ends up as a jail:
fresh namespaces over the entry's overlay root, with the entry's network and cgroups.

    sudo COPPICE_CONFIG=... .venv/bin/python bench/zygote_mechanism.py [--template python]

Starts one entry through JailSubstrate.spawn with the zygote on, waits until it answers,
prints what the host sees of its PID 1 (namespaces against the host's and the zygote's,
uid map, cgroups, capabilities, no_new_privs, seccomp, root, mounts) and destroys it. The
notes of what worked and what did not are in bench/zygote_mechanism_notes.md.
"""

from __future__ import annotations

import argparse
import os
import time
import urllib.request
from pathlib import Path

from coppice.config import Limits, Settings
from coppice.store.store import Store
from coppice.substrates.base import AGENT_PORT, SpawnSpec
from coppice.substrates.jail import JailSubstrate

NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")


def _ns(pid: int) -> dict[str, str]:
    return {n: str(Path(f"/proc/{pid}/ns/{n}").readlink()) for n in NAMESPACES}


def _status(pid: int, keys: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = value.strip()
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="python")
    args = ap.parse_args()
    settings = Settings.load()
    template = Store(settings.database_path).get_template(args.template)
    jail = JailSubstrate(settings)
    jail.prepare_host()
    entry_id = "0z" + os.urandom(4).hex()
    ip = str(settings.jail_network.host_addresses()[-1])
    spec = SpawnSpec(entry_id, template, ip, "zygote-experiment", Limits())
    t0 = time.monotonic()
    handle = jail.spawn(spec)
    spawned = time.monotonic() - t0
    try:
        jail.wait_ready(spec, handle, 30)
        ready = time.monotonic() - t0
        assert handle.head is not None
        pid = handle.head.pid
        zygote_pid = int(handle.driver["zygote"])
        zygote = int(Path(f"/proc/{zygote_pid}/task/{zygote_pid}/children").read_text().split()[0])
        host, mine, zyg = _ns(os.getpid()), _ns(pid), _ns(zygote)
        print(f"spawned in {spawned * 1000:.0f} ms, answering after {ready * 1000:.0f} ms")
        for n in NAMESPACES:
            print(f"  {n:<7} own: {mine[n] not in (host[n], zyg[n])}  ({mine[n]})")
        print("  uid_map:", " ".join(Path(f"/proc/{pid}/uid_map").read_text().split()))
        print("  cgroups:", Path(f"/proc/{pid}/cgroup").read_text().replace("\n", "; "))
        keys = ("NSpid", "CapBnd", "CapEff", "NoNewPrivs", "Seccomp", "Seccomp_filters")
        for key, value in _status(pid, keys).items():
            print(f"  {key}: {value}")
        print(
            "  root holds:", sorted(p.name for p in Path(f"/proc/{pid}/root").iterdir())[:8], "..."
        )
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        print(
            "  mounts:", [" ".join(m.split()[4:5] + m.split(" - ")[1].split()[:1]) for m in mounts]
        )
        with urllib.request.urlopen(f"http://{ip}:{AGENT_PORT}/health", timeout=5) as r:
            print("  agent over the entry's veth:", r.status)
    finally:
        jail.destroy(entry_id, handle)
        jail.zygotes.stop_all()
    print("destroyed; host objects left:", jail.host_objects().all_ids() & {entry_id})


if __name__ == "__main__":
    main()
