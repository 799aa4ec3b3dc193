"""Template build benchmark: what a rebuild costs when nothing or only the last step changed.

    sudo .venv/bin/python bench/template_build_bench.py [--runs 20]

Through the CLI, as a user runs it, on the instance configured for this host
(Settings.load()), with a small Dockerfile on `e2bdev/base` (built first if it is not):
  unchanged rebuild          `coppice template build -f Dockerfile` again: every key cached
  changed last step          the last RUN edited before each run: one step + finalize
  baseline: the CLI floor    `coppice --version`: the interpreter and imports every run pays
  baseline: docker build     the same Dockerfile, cached, when a Docker daemon answers
Also prints the from-scratch build time and size of every built template the store knows.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coppice.config import Settings
from coppice.store.store import Store
from latency_stats import percentiles

NAME = "bench-build"
DOCKERFILE = """\
FROM e2bdev/base
ENV APP=/srv/app
USER root
RUN mkdir -p $APP && echo ready > $APP/status
COPY app.py /srv/app/
WORKDIR /srv/app
USER user
RUN echo {marker} > /tmp/marker
"""


def coppice() -> str:
    return shutil.which("coppice") or str(Path(sys.executable).with_name("coppice"))


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    took = (time.perf_counter() - t0) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return took


def row(label: str, samples: list[float]) -> None:
    p = percentiles(samples)
    print(f"| {label} | {p['p50']:.0f} | {p['p95']:.0f} | {p['p99']:.0f} | {len(samples)} |")


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=20)
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    exe = coppice()
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        (context / "app.py").write_text("print('app')\n")
        dockerfile = context / "Dockerfile"
        dockerfile.write_text(DOCKERFILE.format(marker=0))
        build = [exe, "template", "build", NAME, "-f", str(dockerfile)]
        first = timed(build)
        print(f"first build of {NAME} (base cached or built now): {first / 1000:.1f} s\n")
        print("| measurement (ms) | p50 | p95 | p99 | samples |")
        print("|---|---|---|---|---|")
        row("unchanged rebuild (`template build -f`)", [timed(build) for _ in range(args.runs)])
        changed = []
        for i in range(1, args.runs + 1):
            dockerfile.write_text(DOCKERFILE.format(marker=i))
            changed.append(timed(build))
        row("changed last step (one RUN + finalize)", changed)
        row("baseline: `coppice --version`", [timed([exe, "--version"]) for _ in range(args.runs)])
        if docker_answers():
            (context / "Dockerfile.docker").write_text(
                DOCKERFILE.format(marker=0).replace("FROM e2bdev/base", "FROM debian:bookworm")
            )
            docker = ["docker", "build", "-q", "-f", str(context / "Dockerfile.docker"), tmp]
            try:
                timed(docker)
                row("baseline: `docker build`, cached", [timed(docker) for _ in range(args.runs)])
            except SystemExit as exc:
                print(f"| baseline: `docker build` | skipped: {str(exc).splitlines()[0]} |")
        else:
            print("| baseline: `docker build` | skipped: no Docker daemon answers here |||")
    settings = Settings.load()
    print("\n| template | its last build took | size |")
    print("|---|---|---|")
    for t in Store(settings.database_path).list_templates():
        print(f"| {t.name} | {t.build_seconds:.0f} s | {t.size_bytes / 2**30:.2f} GiB |")
    subprocess.run([exe, "template", "rm", NAME], capture_output=True, check=False)


if __name__ == "__main__":
    main()
