"""Gateway benchmark through the real e2b SDKs; prints p50/p95/p99.

    sudo .venv/bin/python bench/gateway_bench.py [--runs 100] [--pool 12]

Starts `coppice serve` on a free loopback port (instance from Settings.load()), keeps the
python pool at --pool entries, then times:
  create -> first command output    Sandbox.create() + commands.run("echo ok")
  ... with egress rules              the same with network={"deny_out": [...]}
  create -> first run_code result   code_interpreter Sandbox.create() + run_code("1+1")
at concurrency 1 and 10. Each sample's sandbox is killed afterwards (untimed), and every
round starts when the pool is full again: the numbers are for a warm pool at rest, which is
what the pool is for (cold starts are measured by bench/pool_bench.py, and refills running
during a request cost CPU on a 2-CPU host: see the README).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from multiprocessing.connection import Connection
from pathlib import Path

from coppice.config import Settings
from coppice.lifecycle import State
from coppice.store.store import Store
from latency_stats import percentiles
from serve_process import start_gateway, stop_gateway

API_KEY = "bench"


def wait_for_pool(store: Store, template: str, at_least: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = sum(1 for e in store.list_entries(template) if e.state is State.AVAILABLE)
        if ready >= at_least:
            return
        time.sleep(0.05)
    raise SystemExit(f"the {template} pool did not refill to {at_least} in {timeout_s:.0f} s")


def client_loop(conn: Connection, env: dict[str, str]) -> None:
    """One SDK user in a process of its own: the samples of a round then run truly in
    parallel, as separate clients would, instead of taking turns on one interpreter's GIL."""
    os.environ.update(env)
    os.environ.pop("E2B_DEBUG", None)
    from e2b import Sandbox
    from e2b_code_interpreter import Sandbox as CodeSandbox

    while True:
        kind = conn.recv()
        if kind is None:
            return
        t0 = time.perf_counter()
        if kind in ("command", "egress"):
            # "egress": the same with rules of its own, whose firewall chain is set up
            # before the create answers (a sandbox without rules costs the firewall nothing)
            network = {"deny_out": ["203.0.113.0/24"]} if kind == "egress" else None
            sbx = Sandbox.create(network=network)  # type: ignore[arg-type]
            result = sbx.commands.run("echo ok").stdout
            ok = result == "ok\n"
        else:
            sbx = CodeSandbox.create()
            result = sbx.run_code("1+1").text
            ok = result == "2"
        ms = (time.perf_counter() - t0) * 1000
        conn.send((ms, ok, result))
        sbx.kill()


class Clients:
    def __init__(self, count: int, env: dict[str, str]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_loop, args=(child, env), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def round(self, kind: str, concurrency: int) -> list[float]:
        for conn in self.conns[:concurrency]:
            conn.send(kind)
        samples = []
        for conn in self.conns[:concurrency]:
            ms, ok, result = conn.recv()
            if not ok:
                raise SystemExit(f"{kind} sample answered {result!r}")
            samples.append(ms)
        return samples

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)


def rounds(
    store: Store, clients: Clients, kind: str, runs: int, concurrency: int, pool: int
) -> list[float]:
    """`runs` samples, `concurrency` clients at a time; sandboxes killed after (untimed).

    Each round starts on a full pool: refilling (a Jupyter kernel start per entry) is CPU
    work that would otherwise share the 2 CPUs with the requests being timed.
    """
    samples: list[float] = []
    while len(samples) < runs:
        wait_for_pool(store, "python", pool)
        time.sleep(0.3)  # the last refilled entry's freeze settles
        samples += clients.round(kind, concurrency)
    return samples[:runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--pool", type=int, default=12)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    settings = Settings.load()
    store = Store(settings.database_path)
    log = Path("/tmp/coppice-gateway-bench.log")
    proc, url = start_gateway(
        log, {"COPPICE_API_KEYS": API_KEY, "COPPICE_POOL_TARGETS": f"python={args.pool}"}
    )
    env = {"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": API_KEY}
    clients = Clients(10, env)
    results: dict[str, dict[str, float]] = {}
    try:
        wait_for_pool(store, "python", args.pool)
        for kind in ("command", "code"):  # imports and connection pools of every client
            rounds(store, clients, kind, 10, 10, args.pool)
        for concurrency in (1, 10):
            for name, kind in (
                ("create -> first command output", "command"),
                ("create with egress rules -> first command output", "egress"),
                ("create -> first run_code result", "code"),
            ):
                key = f"{name} (concurrency {concurrency})"
                if kind == "egress" and concurrency != 1:
                    continue
                samples = rounds(store, clients, kind, args.runs, concurrency, args.pool)
                results[key] = percentiles(samples)
                r = results[key]
                print(
                    f"{key:<62} p50 {r['p50']:7.2f} ms  p95 {r['p95']:7.2f} ms  "
                    f"p99 {r['p99']:7.2f} ms  (n={r['n']:.0f})",
                    flush=True,
                )
    finally:
        clients.close()
        stop_gateway(proc)
    print(f"host: {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
