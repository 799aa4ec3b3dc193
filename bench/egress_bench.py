"""Egress benchmark: what a sandbox's own egress rules cost in nft transactions.

    sudo .venv/bin/python bench/egress_bench.py [--sandboxes 100] [--iterations 200]

Runs in a network namespace of its own (unshared by this process, gone when it exits), with a
dummy bridge and the base egress table that `SandboxEgress.ensure` installs, then `--sandboxes`
sandboxes' chains loaded, so each measured transaction meets a table the size of a busy host's.
Times, through the same code the gateway runs:
  baseline: nft -f (empty)   one `nft -f -` of nothing: the price of starting nft at all
  set                        SandboxEgress.set: a sandbox's allow/deny rules (at create)
  clear                      SandboxEgress.clear: back to the default (every destroy)
  pin                        SandboxEgress.pin: three addresses an allowed domain resolved to
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute

from coppice.config import NetworkSettings, Settings
from coppice.egress_policy import EgressPolicy
from coppice.net.egress_table import SandboxEgress
from latency_stats import percentiles

BRIDGE = "cbench0"
SUBNET = "10.250.0.0/24"
CLONE_NEWNET = 0x40000000  # os.unshare arrives only in Python 3.12
PINNED = ("198.51.100.20", "198.51.100.21", "203.0.113.30")


def timed(n: int, step: Callable[[int], None]) -> list[float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        step(i)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sandboxes", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench/results/egress.json"))
    args = ap.parse_args()
    # A namespace of this process alone: nft, /proc/sys/net and the bridge are all its own.
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
        raise SystemExit(f"unshare: {os.strerror(ctypes.get_errno())} (run as root)")
    with IPRoute() as ipr:
        ipr.link("add", ifname=BRIDGE, kind="bridge")
    network = NetworkSettings(bridge=BRIDGE, subnet=SUBNET, first_host=2, last_host=253)
    egress = SandboxEgress(Settings.load(), network)
    egress.ensure()
    policy = EgressPolicy.parse(
        False, ["198.51.100.0/28", "pypi.example", "*.npm.example"], ["203.0.113.7"]
    )
    addresses = [str(a) for a in network.host_addresses()]
    loaded = addresses[: args.sandboxes]
    for ip in loaded:
        egress.set(ip, policy)
    probe = addresses[args.sandboxes]

    def empty(_: int) -> None:
        subprocess.run(["nft", "-f", "-"], input="", text=True, check=True, capture_output=True)

    rows = {"baseline: nft -f (empty)": timed(args.iterations, empty)}
    set_ms: list[float] = []
    clear_ms: list[float] = []
    pin_ms: list[float] = []
    for _ in range(args.iterations):
        set_ms += timed(1, lambda _: egress.set(probe, policy))
        pin_ms += timed(1, lambda _: egress.pin(probe, PINNED))
        clear_ms += timed(1, lambda _: egress.clear(probe))
    rows |= {"set": set_ms, "clear": clear_ms, "pin": pin_ms}
    base = percentiles(rows["baseline: nft -f (empty)"])["p50"]
    print(f"{args.sandboxes} sandboxes' chains loaded, {args.iterations} iterations, ms")
    print(f"{'step':<26}{'p50':>8}{'p95':>8}{'p99':>8}{'x base p50':>12}")
    report = {}
    for name, samples in rows.items():
        p = percentiles(samples)
        report[name] = p
        print(f"{name:<26}{p['p50']:>8.1f}{p['p95']:>8.1f}{p['p99']:>8.1f}{p['p50'] / base:>12.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
