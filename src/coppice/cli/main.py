"""The `coppice` command. Thin: parse, call the library, print. Errors are translated here."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import click

from coppice.cli.render import RichProgress, entries_table, err, out, pools_table
from coppice.config import Limits, Settings
from coppice.errors import CoppiceError, InvalidRequest, PrerequisiteMissing
from coppice.gateway.runner import GatewayRunner
from coppice.images.builder import TemplateBuilder
from coppice.images.dockerfile import spec_from_dockerfile
from coppice.images.keys import PoolKey
from coppice.images.recipes import RECIPES
from coppice.pool.controller import PoolController, ReconcileReport
from coppice.progress import Progress
from coppice.smoke import SmokeRig
from coppice.store.store import Store
from coppice.substrates import registry
from coppice.substrates.build_jail import template_builder


def _settings() -> Settings:
    return Settings.load()


def _controller(progress: Progress | None = None, reconcile: bool = True) -> PoolController:
    if os.geteuid() != 0:
        raise PrerequisiteMissing("coppice pool commands need root; run them with sudo")
    settings = _settings()
    controller = PoolController(settings, Store(settings.database_path), progress=progress)
    if reconcile:
        _print_reconcile(controller.reconcile(), quiet=True)
    return controller


def _print_reconcile(report: ReconcileReport, quiet: bool) -> None:
    for line in report.replaced:
        err.print(f"reconcile: replaced dead entry {line}")
    for entry_id in report.finished_teardowns:
        err.print(f"reconcile: finished tearing down {entry_id}")
    for entry_id in report.leftovers_removed:
        err.print(f"reconcile: removed leftovers of unknown entry {entry_id}")
    for problem in report.problems:
        err.print(f"reconcile: could not fix {problem}")
    if not quiet and not report.changed and not report.problems:
        err.print("reconcile: nothing to fix")


@click.group()
@click.version_option(package_name="coppice")
def cli() -> None:
    """Coppice: warm pools of sandboxes for untrusted code."""


# -- templates ------------------------------------------------------------------------------


@cli.group()
def template() -> None:
    """Build, list and remove templates."""


@template.command("build")
@click.argument("name")
@click.option(
    "-f",
    "--file",
    "dockerfile",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Build from this Dockerfile (E2B's e2b.Dockerfile convention) instead of a recipe.",
)
@click.option(
    "--context",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Where COPY sources are (default: the Dockerfile's directory).",
)
@click.option("--substrate", type=click.Choice(registry.production_names()), default="jail")
@click.option("--cpu-count", type=click.IntRange(1, 64), default=None)
@click.option("--memory-mb", type=click.IntRange(128, 1 << 20), default=None)
@click.option("--disk-mb", type=click.IntRange(256, 1 << 24), default=None)
@click.option("--force", is_flag=True, help="Rebuild every step whatever the cache holds.")
def template_build(
    name: str,
    dockerfile: Path | None,
    context: Path | None,
    substrate: str,
    cpu_count: int | None,
    memory_mb: int | None,
    disk_mb: int | None,
    force: bool,
) -> None:
    """Build template NAME: a built-in recipe (python, base, code-interpreter-v1, ...) or,
    with -f, a Dockerfile. Cached per step: an unchanged template takes a second or two."""
    settings = _settings()
    started = time.monotonic()
    store = Store(settings.database_path)
    with RichProgress() as progress:
        builder = template_builder(settings, store, progress)
        if dockerfile is None:
            if context or cpu_count or memory_mb or disk_mb or substrate != "jail":
                raise InvalidRequest(
                    "--context, --substrate and the limits go with -f; a recipe fixes them"
                )
            record, built = builder.build(name, force=force)
        else:
            base = settings.limits
            limits = None
            if cpu_count or memory_mb or disk_mb:
                limits = Limits(
                    memory_mb=memory_mb or base.memory_mb,
                    pids=base.pids,
                    cpus=float(cpu_count) if cpu_count else base.cpus,
                    disk_mb=disk_mb or base.disk_mb,
                )
            spec, files = spec_from_dockerfile(
                name, dockerfile, context, limits=limits, substrate=substrate
            )
            record, built = builder.build_spec(spec, files, force=force)
    took = time.monotonic() - started
    verb = "built" if built else "up to date:"
    out.print(
        f"{verb} template {record.name} ({record.substrate}, "
        f"{record.recipe_hash[:12]}, {record.size_bytes / 2**20:.0f} MiB) in {took:.1f} s"
    )


@template.command("list")
@click.option("--json", "as_json", is_flag=True)
def template_list(as_json: bool) -> None:
    """Show built templates."""
    settings = _settings()
    records = Store(settings.database_path).list_templates()
    if as_json:
        click.echo(json.dumps([r.as_json() for r in records], indent=2))
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("name", "substrate", "recipe", "size", "built", "build time"):
        table.add_column(col)
    for r in records:
        table.add_row(
            r.name,
            r.substrate,
            r.recipe_hash[:12],
            f"{r.size_bytes / 2**20:.0f} MiB",
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.built_at)),
            f"{r.build_seconds:.1f} s",
        )
    out.print(table)


@template.command("rm")
@click.argument("name")
def template_rm(name: str) -> None:
    """Remove template NAME and its files (its pool must be drained)."""
    settings = _settings()
    store = Store(settings.database_path)
    substrate = store.get_template(name).substrate
    TemplateBuilder(settings, store).remove(name)
    # What the driver keeps per template (a VM's golden snapshot, RAM in /dev/shm) goes too.
    registry.load(substrate, settings).forget_template(name)
    out.print(f"removed template {name}")


# -- pool -----------------------------------------------------------------------------------


@cli.group()
def pool() -> None:
    """Warm, check out, return, drain and list pool entries."""


@pool.command("init")
def pool_init() -> None:
    """Prepare the host: bridges, cgroups, directories, database, pool SSH key."""
    c = _controller(reconcile=False)
    c.init_host()
    PoolKey.at(c.settings.keys_dir).ensure()
    _print_reconcile(c.reconcile(), quiet=True)
    out.print(
        f"host ready: state in {c.settings.state_dir}, jail bridge "
        f"{c.settings.jail_network.bridge} ({c.settings.jail_network.gateway}/"
        f"{c.settings.jail_network.prefixlen})"
    )


@pool.command("deinit")
def pool_deinit() -> None:
    """Undo `init` (bridges, cgroup parents); every pool must be drained first."""
    _controller().deinit_host()
    out.print("host objects removed")


@pool.command("warm")
@click.argument("template_name", metavar="TEMPLATE")
@click.option("--count", "-n", type=int, required=True, help="How many entries to add.")
def pool_warm(template_name: str, count: int) -> None:
    """Start COUNT entries of TEMPLATE, wait until they answer, pause them."""
    with RichProgress() as progress:
        report = _controller(progress).warm(template_name, count)
    out.print(
        f"warmed {len(report.started)}/{report.requested} x {template_name} in "
        f"{report.seconds:.2f} s ({len(report.started) / max(report.seconds, 1e-9):.1f}"
        " entries/s)"
    )
    if report.failures:
        raise CoppiceError(f"{len(report.failures)} entries failed; first: {report.failures[0]}")


@pool.command("checkout")
@click.argument("template_name", metavar="TEMPLATE")
@click.option("--json", "as_json", is_flag=True)
def pool_checkout(template_name: str, as_json: bool) -> None:
    """Hand out an available entry of TEMPLATE and resume it."""
    c = _controller()
    t0 = time.perf_counter()
    e = c.checkout(template_name)
    ms = (time.perf_counter() - t0) * 1000
    pid = e.pid
    if as_json:
        click.echo(json.dumps({"id": e.id, "ip": e.ip, "pid": pid, "checkout_ms": ms}))
    else:
        out.print(f"id={e.id} ip={e.ip} pid={pid} ({ms:.1f} ms)")
        out.print(f"ssh: coppice ssh {e.id}", style="dim")


@pool.command("return")
@click.argument("entry_id", metavar="ID")
def pool_return(entry_id: str) -> None:
    """Destroy entry ID and start a fresh one in its place."""
    fresh = _controller().return_entry(entry_id)
    out.print(f"returned {entry_id}" + (f"; replaced by {fresh.id}" if fresh else ""))


@pool.command("drain")
@click.argument("template_name", metavar="TEMPLATE")
def pool_drain(template_name: str) -> None:
    """Tear down every entry of TEMPLATE."""
    n = _controller().drain(template_name)
    out.print(f"drained {n} entries of {template_name}")


@pool.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--template", "template_name", default=None)
def pool_list(as_json: bool, template_name: str | None) -> None:
    """Show each pool (size, the gateway's target and why) and its entries."""
    controller = _controller()
    entries = controller.list(template_name)
    targets = controller.store.pool_targets()
    if template_name is not None:
        targets = {k: v for k, v in targets.items() if k == template_name}
    if as_json:
        click.echo(json.dumps([e.as_json() for e in entries], indent=2))
    else:
        pools_table(entries, targets)
        out.print()
        entries_table(entries)


@pool.command("reconcile")
def pool_reconcile() -> None:
    """Compare the database with the host and fix what differs; report what was fixed."""
    c = _controller(reconcile=False)
    _print_reconcile(c.reconcile(), quiet=False)


# -- ssh and smoke --------------------------------------------------------------------------


@cli.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("entry_id", metavar="ID")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(entry_id: str, command: tuple[str, ...]) -> None:
    """SSH into entry ID as root with the pool key."""
    c = _controller(reconcile=False)
    e = c.store.get(entry_id)
    key = PoolKey.at(c.settings.keys_dir)
    argv = key.ssh_argv(e.ip, *command)
    os.execvp("ssh", argv)


@cli.command("smoke")
@click.option(
    "--template", "template_name", default=None, help="Default: the substrate's python template."
)
@click.option(
    "--substrate",
    type=click.Choice(registry.production_names()),
    default="jail",
    show_default=True,
)
@click.option("--count", default=2, show_default=True)
@click.option("--keep", is_flag=True, help="Warm the pool again after the gates pass.")
def smoke(template_name: str | None, substrate: str, count: int, keep: bool) -> None:
    """Drive the full lifecycle against a real pool and gate every step."""
    if template_name is None:
        found = next((r.name for r in RECIPES.values() if r.substrate == substrate), None)
        if found is None:
            raise InvalidRequest(f"no recipe builds a {substrate} template")
        template_name = found
    c = _controller()
    c.init_host()
    report = SmokeRig(c, template_name, count).run()
    for g in report.gates:
        mark = "[green]PASS[/]" if g.passed else "[red]FAIL[/]"
        out.print(f"{mark} {g.name:<16} {g.detail}")
    out.print()
    out.print(f"{'template':<10}{'pool_size':<11}{'warm_s':<8}{'checkout_ms':<13}{'py_result'}")
    out.print(
        f"{report.template:<10}{report.pool_size:<11}{report.warm_s:<8.2f}"
        f"{report.checkout_ms:<13.2f}{report.py_result or '-'}"
    )
    out.print()
    failed = report.failed_gate
    if failed is not None:
        out.print(f"[red]GATE FAILED: {failed.name}[/]: {failed.detail}")
        sys.exit(1)
    out.print("ALL GATES PASSED")
    if keep:
        rep = c.warm(template_name, count)
        out.print(
            f"pool {template_name} kept warm: {len(rep.started)} entries (`coppice pool list`)"
        )


@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=3000, show_default=True, type=int)
@click.option(
    "--pool",
    "pools",
    multiple=True,
    metavar="TEMPLATE=N",
    help="Keep TEMPLATE's pool at N entries (repeatable; default: the pool_targets setting).",
)
def serve(host: str, port: int, pools: tuple[str, ...]) -> None:
    """Run the E2B-compatible gateway with warm pools kept at size in the background."""
    settings = _settings()
    if pools:
        settings = dataclasses.replace(settings, pool_targets=",".join(pools))
    runner = GatewayRunner(settings, host, port)
    runner.check()
    with RichProgress() as progress:
        c = _controller(progress, reconcile=False)
        c.init_host()
        PoolKey.at(settings.keys_dir).ensure()
        _print_reconcile(c.reconcile(), quiet=True)
        for template_name, target in settings.pool_target_map().items():
            missing = target - c.pool_size(template_name)
            if missing > 0:
                report = c.warm(template_name, missing)
                for failure in report.failures:
                    err.print(f"warming {template_name}: {failure}")
    for line in runner.banner():
        out.print(line, soft_wrap=True)
    runner.run(c)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CoppiceError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
