"""The ComputeSDK sandbox benchmark's method against `coppice serve`, through the real SDK.

    sudo .venv/bin/python bench/computesdk_bench.py [--count 100] [--url URL]

Timer from `Sandbox.create()` until the first command (`node -v`) has answered; teardown
(kill) is not timed. Three modes, `--count` sandboxes each:
  sequential   one at a time
  staggered    one launch every `--stagger-ms` (200), each running on its own
  burst        all at once
Without --url it starts `coppice serve` on a free loopback port with the default
configuration (the instance Settings.load() names) and stops it at the end; with --url it
drives a service already running (e.g. `scripts/up`). Between modes it waits for the pool
to settle (nothing warming) so each mode starts from what the service keeps at rest.

Baselines in the same run, each `--baseline-runs` times one after the other:
  bare process     `node -v` on this host: the floor
  cold bubblewrap  `bwrap` over the template's root (read-only), new namespaces, `node -v`
  docker run --rm  of an image made from the same root, when a Docker daemon answers
Every mode's p50 and p99 is printed over each baseline's p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from coppice.config import Settings
from coppice.host import mounts
from coppice.lifecycle import State
from coppice.store.store import Store
from latency_stats import percentiles
from serve_process import start_gateway, stop_gateway

COMMAND = "node -v"
MS_RDONLY = 1


async def one(template: str, timeout_s: int) -> tuple[float | None, str]:
    """(ms, "ok") or (None, why it failed)."""
    from e2b import AsyncSandbox

    t0 = time.perf_counter()
    sbx = None
    try:
        sbx = await AsyncSandbox.create(template, timeout=timeout_s)
        done = await sbx.commands.run(COMMAND)
        ms = (time.perf_counter() - t0) * 1000
        if done.exit_code != 0 or not done.stdout.startswith("v"):
            return None, f"{COMMAND} answered {done.exit_code}: {done.stdout!r}"
        return ms, "ok"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        if sbx is not None:
            with suppress(Exception):  # teardown is not what is measured
                await sbx.kill()


async def run_mode(
    mode: str, n: int, template: str, stagger_s: float
) -> list[tuple[float | None, str]]:
    if mode == "sequential":
        return [await one(template, 120) for _ in range(n)]
    if mode == "staggered":
        tasks = []
        for _ in range(n):
            tasks.append(asyncio.create_task(one(template, 120)))
            await asyncio.sleep(stagger_s)
        return list(await asyncio.gather(*tasks))
    return list(await asyncio.gather(*(one(template, 120) for _ in range(n))))


def settle(store: Store, template: str, timeout_s: float = 300) -> None:
    """Until nothing of `template` is warming or being torn down for a few seconds."""
    quiet_since = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = any(
            e.state in (State.WARMING, State.RETURNING) for e in store.list_entries(template)
        )
        if busy:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 3:
            return
        time.sleep(0.2)


def timed_runs(n: int, argv: list[str]) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


@contextmanager
def template_root(settings: Settings, template: str) -> Iterator[Path]:
    """The template's root file system, read-only, at a temporary mount point."""
    lower = Store(settings.database_path).get_template(template).rootfs
    with tempfile.TemporaryDirectory(prefix="computesdk-root-") as tmp:
        point = Path(tmp)
        mounts.mount("overlay", point, "overlay", MS_RDONLY, f"lowerdir={lower}")
        try:
            yield point
        finally:
            mounts.unmount(point)


def docker_baseline(root: Path, n: int) -> tuple[list[float] | None, str]:
    if shutil.which("docker") is None:
        return None, "skipped: no docker command on this host"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        return None, "skipped: no Docker daemon answers (`docker info` fails)"
    image = "coppice-computesdk-baseline"
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", image], stdin=tar.stdout, check=True)
    tar.wait()
    try:
        return timed_runs(n, ["docker", "run", "--rm", image, *COMMAND.split()]), "ok"
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)


def host_cpu_s() -> float:
    """CPU time the whole host has spent busy (all CPUs), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(f) for f in fields]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def row(label: str, samples: list[float], ok: int, n: int) -> dict[str, float]:
    p = (
        percentiles(samples)
        if samples
        else {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "n": 0}
    )
    print(f"{label:<26}{ok:>4}/{n:<4}{p['p50']:>10.1f}{p['p95']:>10.1f}{p['p99']:>10.1f}")
    return {**p, "ok": ok, "count": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--template", default="base", help="what Sandbox.create() starts by default")
    ap.add_argument("--url", help="a running coppice serve (default: start one)")
    ap.add_argument("--modes", default="sequential,staggered,burst")
    ap.add_argument("--stagger-ms", type=float, default=200.0)
    ap.add_argument("--baseline-runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("bench/results/computesdk.json"))
    args = ap.parse_args()
    settings = Settings.load()
    store = Store(settings.database_path)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_gateway(Path("/tmp/coppice-computesdk-bench.log"), {})
    os.environ.update(
        {
            "E2B_API_URL": url,
            "E2B_SANDBOX_URL": url,
            "E2B_API_KEY": os.environ.get("E2B_API_KEY", "bench"),
        }
    )
    os.environ.pop("E2B_DEBUG", None)
    results: dict[str, object] = {"url": url, "template": args.template, "command": COMMAND}
    failures: dict[str, Counter[str]] = {}
    #: per mode: CPU-seconds of the host, of this client, of the gateway process
    cpu: dict[str, tuple[float, ...]] = {}
    gateway_pid = proc.pid if proc is not None else None
    print(f"ComputeSDK method: {args.template}, `{COMMAND}`, {args.count} sandboxes per mode, ms\n")
    print(f"{'':<26}{'ok':>9}{'p50':>10}{'p95':>10}{'p99':>10}")
    try:
        settle(store, args.template)
        asyncio.run(run_mode("sequential", 5, args.template, 0))  # SDK imports, connections
        for mode in args.modes.split(","):
            settle(store, args.template)
            before = (host_cpu_s(), own_cpu_s(), process_cpu_s(gateway_pid))
            got = asyncio.run(run_mode(mode, args.count, args.template, args.stagger_ms / 1000))
            used = (host_cpu_s(), own_cpu_s(), process_cpu_s(gateway_pid))
            cpu[mode] = tuple(a - b for a, b in zip(used, before, strict=True))
            samples = [ms for ms, _ in got if ms is not None]
            failures[mode] = Counter(why for ms, why in got if ms is None)
            results[mode] = row(mode, samples, len(samples), args.count)
    finally:
        if proc is not None:
            stop_gateway(proc)
    print()
    with template_root(settings, args.template) as root:
        baselines: dict[str, list[float]] = {}
        baselines["bare process"] = timed_runs(args.baseline_runs, COMMAND.split())
        baselines["cold bubblewrap"] = timed_runs(
            args.baseline_runs,
            ["bwrap", "--ro-bind", str(root), "/", "--proc", "/proc", "--dev", "/dev",
             "--unshare-all", "--die-with-parent", "--clearenv",
             "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", *COMMAND.split()],
        )  # fmt: skip
        docker, why = docker_baseline(root, args.baseline_runs)
    for name, samples in baselines.items():
        results[name] = row(name, samples, len(samples), len(samples))
    if docker is None:
        print(f"{'docker run --rm':<26}{why}")
    else:
        results["docker run --rm"] = row("docker run --rm", docker, len(docker), len(docker))
        baselines["docker run --rm"] = docker
    print("\nratios (mode p50 and p99 over each baseline's p50)")
    for mode in args.modes.split(","):
        r = results.get(mode)
        if not isinstance(r, dict) or not r["n"]:
            continue
        parts = []
        for name, samples in baselines.items():
            base = percentiles(samples)["p50"]
            parts.append(f"{name}: {r['p50'] / base:.1f}x / {r['p99'] / base:.1f}x")
        print(f"  {mode:<12}" + "; ".join(parts))
    print("\nCPU-seconds per mode (host / this SDK client / the gateway process; the rest is")
    print("the sandboxes, their warming and the kernel):")
    for mode, (host, client, gateway) in cpu.items():
        print(f"  {mode:<12}{host:>7.1f} / {client:>5.1f} / {gateway:>5.1f}")
        results[f"{mode} cpu"] = {"host_s": host, "client_s": client, "gateway_s": gateway}
    for mode, reasons in failures.items():
        for reason, count in reasons.most_common(3):
            print(f"  {mode} failures: {count} x {reason}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
