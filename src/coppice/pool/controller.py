"""PoolController: carries out the lifecycle rules against the store and the substrates.

Decisions (which entry, which address, which state follows) are made inside store
transactions using `lifecycle`; this class performs the side effects those decisions ask for
and reports each failure as the error that names its fix.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from coppice.config import Limits, Settings
from coppice.egress_policy import EgressPolicy
from coppice.errors import (
    CoppiceError,
    EntryNotFound,
    IllegalTransition,
    InvalidRequest,
    SandboxDied,
    SubstrateError,
)
from coppice.host.boot import boot_time
from coppice.host.processes import ProcessIdentity
from coppice.lifecycle import Action, Event, State
from coppice.pool import deaths
from coppice.pool import reconcile as reconcile_rules
from coppice.pool.observer import NoObserver, PoolObserver
from coppice.progress import Progress, SilentProgress
from coppice.store.disk_budget import MB
from coppice.store.records import (
    EntryRecord,
    SandboxRecord,
    SnapshotArtifact,
    SnapshotRecord,
    TemplateRecord,
)
from coppice.store.store import HANDED_OUT, Applied, Buried, Store
from coppice.substrates import registry
from coppice.substrates.base import SpawnSpec, Substrate
from coppice.substrates.post_mortem import PostMortem
from coppice.substrates.snapshots_not_yet import files_only_pause_refused

log = logging.getLogger("coppice.pool")


@dataclass
class WarmReport:
    template: str
    requested: int
    started: list[EntryRecord] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ReconcileReport:
    replaced: list[str] = field(default_factory=list)
    finished_teardowns: list[str] = field(default_factory=list)
    leftovers_removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: frozen sandboxes a reboot ended, kept as files-only pauses
    kept_paused: list[str] = field(default_factory=list)
    #: half-made snapshots and forks' captures removed
    snapshots_removed: list[str] = field(default_factory=list)
    #: sandboxes whose resume or capture was cut off, put back as they were
    put_back: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(
            self.replaced
            or self.finished_teardowns
            or self.leftovers_removed
            or self.kept_paused
            or self.snapshots_removed
            or self.put_back
        )


class PoolController:
    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        substrates: dict[str, Substrate] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or Store(settings.database_path)
        self.substrates = (
            substrates if substrates is not None else registry.production_substrates(settings)
        )
        self.progress = progress or SilentProgress()
        #: replace returned or dead entries right away; a service that refills its pools in
        #: the background turns this off so that returns answer at once
        self.respawn = True
        #: substrates whose host set-up this process has done and not seen fail since: the
        #: set-up (nft, netlink, sysctl) is not repeated for every refill
        self._prepared: set[str] = set()
        #: hears checkouts, cold starts, failed warms and deaths (the gateway's metrics)
        self.observer: PoolObserver = NoObserver()
        self.post_mortem = PostMortem()
        #: the host's boot time (unix seconds), for telling a host restart from a crash
        self.boot_time: Callable[[], float | None] = boot_time
        #: one death examined at a time: two finders of the same death (the keeper, the
        #: relay) must not split what it left (the exit status is read once) between them
        self._examining = threading.Lock()

    # -- helpers ------------------------------------------------------------------------------

    def substrate(self, name: str) -> Substrate:
        try:
            return self.substrates[name]
        except KeyError:
            raise SubstrateError(f"substrate {name!r} is not available on this host") from None

    def _limits(self, template: TemplateRecord) -> Limits:
        return template.policy.limits or self.settings.limits

    def _spec(self, entry: EntryRecord, template: TemplateRecord) -> SpawnSpec:
        return SpawnSpec(entry.id, template, entry.ip, entry.hostname, self._limits(template))

    def _addresses(self, substrate: str) -> list[object]:
        return list(self.substrate(substrate).network.host_addresses())

    def _reserve(self, template: TemplateRecord, count: int) -> list[EntryRecord]:
        return self.store.reserve(
            template.name,
            template.substrate,
            count,
            self._addresses(template.substrate),
            hostname_prefix=template.name,
        )

    def capacity(self, substrate: str) -> int:
        return len(self._addresses(substrate))

    # -- host ---------------------------------------------------------------------------------

    def init_host(self) -> None:
        for sub in self.substrates.values():
            self._prepare(sub)

    def _prepare(self, sub: Substrate) -> None:
        sub.prepare_host()
        self._prepared.add(sub.name)

    def _ensure_host(self, sub: Substrate) -> None:
        """Host set-up when it is needed: first use in this process, or after a bring-up
        failed (a bridge deleted under us is put back by the next warm)."""
        if sub.name not in self._prepared:
            self._prepare(sub)

    def deinit_host(self) -> None:
        if self.store.list_entries():
            raise IllegalTransition("host", "in use", "tear down the host of")
        for sub in self.substrates.values():
            sub.teardown_host()

    # -- warm ---------------------------------------------------------------------------------

    def warm(self, template_name: str, count: int) -> WarmReport:
        template = self.store.get_template(template_name)
        sub = self.substrate(template.substrate)
        cap = self.capacity(template.substrate)
        if not 1 <= count <= cap:
            raise InvalidRequest(f"--count must be between 1 and {cap}, not {count}")
        self._ensure_host(sub)
        started = time.monotonic()
        entries = self._reserve(template, count)
        report = WarmReport(template.name, count)
        self.progress.stage(f"warming {count} x {template.name}", total=count)
        self._bring_up_all(template, entries, report)
        report.seconds = time.monotonic() - started
        return report

    def _bring_up_all(
        self, template: TemplateRecord, entries: list[EntryRecord], report: WarmReport
    ) -> None:
        limit = self.substrate(template.substrate).spawn_parallelism
        workers = max(1, min(len(entries), limit))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="warm") as pool:
            futures = [pool.submit(self._bring_up, template, e) for e in entries]
            for fut in futures:
                try:
                    report.started.append(fut.result())
                    self.progress.advance(report.started[-1].id)
                except CoppiceError as exc:
                    report.failures.append(str(exc))
                    self.progress.advance("failed")

    def _bring_up(
        self,
        template: TemplateRecord,
        entry: EntryRecord,
        pause: bool = True,
        artifact: SnapshotArtifact | None = None,
    ) -> EntryRecord:
        """Spawn (from `artifact`, a snapshot, if given) and wait until it answers; then
        freeze it and make it available, or (with `pause` false, a cold start) leave it
        running and warming for the caller."""
        sub = self.substrate(template.substrate)
        spec = self._spec(entry, template)
        try:
            if artifact is None:
                handle = sub.spawn(spec)
            else:
                handle = sub.spawn_from_snapshot(spec, artifact)
            self.store.set_handle(entry.id, handle)
            wait_s = template.policy.ready_timeout_s or self.settings.ready_timeout_s
            sub.wait_ready(spec, handle, wait_s)
            if not pause:
                return entry  # still warming; the caller hands it out
            sub.pause(entry.id, handle)
            return self.store.apply(entry.id, Event.READY).entry
        except (CoppiceError, OSError) as exc:
            error = exc if isinstance(exc, CoppiceError) else SubstrateError(str(exc))
            self.observer.warm_failed(template.name)
            self._prepared.discard(sub.name)
            # Drained while it was warming: the drain tears it down instead.
            with contextlib.suppress(IllegalTransition, EntryNotFound):
                self.perform(self.store.apply(entry.id, Event.FAIL, str(error)))
            raise error from exc

    # -- checkout / return --------------------------------------------------------------------

    def checkout(self, template_name: str, sandbox: SandboxRecord | None = None) -> EntryRecord:
        started = time.perf_counter()
        template = self.store.get_template(template_name)
        sub = self.substrate(template.substrate)
        while True:
            applied = self.store.checkout(template.name, sandbox)
            entry = applied.entry
            try:
                if not sub.is_alive(entry.id, entry.handle):
                    raise SandboxDied(entry.id)
            except SubstrateError as exc:
                # A dead entry is replaced and the next one is tried; the caller never sees
                # a sandbox that cannot answer.
                self.perform(self.store.apply(entry.id, Event.DIED, str(exc)), self.respawn)
                continue
            # Its rules before its processes run again: nothing it does escapes them.
            self._egress_or_return(entry, sandbox)
            try:
                sub.resume(entry.id, entry.handle)
            except SubstrateError as exc:
                self.perform(self.store.apply(entry.id, Event.DIED, str(exc)), self.respawn)
                continue
            self.observer.checked_out(template.name, time.perf_counter() - started)
            return entry

    def start_cold(
        self,
        template_name: str,
        sandbox: SandboxRecord,
        artifact: SnapshotArtifact | None = None,
    ) -> EntryRecord:
        """Start one entry now and hand it straight out (the pool had none available, or it
        starts from the snapshot `artifact`, which no pool holds). It goes from warming to in
        use without being paused or ever available to others."""
        template = self.store.get_template(template_name)
        self._ensure_host(self.substrate(template.substrate))
        (fresh,) = self._reserve(template, 1)
        self._bring_up(template, fresh, pause=False, artifact=artifact)
        # The sandbox's lifetime runs from its hand-out, not from the request: a cold start
        # may take longer than a short timeout, and the reaper would take it at once.
        late = time.time() - sandbox.started_at
        sandbox = replace(
            sandbox, started_at=sandbox.started_at + late, end_at=sandbox.end_at + late
        )
        try:
            entry = self.store.hand_out(fresh.id, sandbox).entry
        except (IllegalTransition, EntryNotFound) as exc:
            # Drained (or found dead by a reconcile) while it started: it is not ours.
            with contextlib.suppress(IllegalTransition, EntryNotFound):
                self.perform(self.store.apply(fresh.id, Event.FAIL, str(exc)))
            raise SubstrateError(f"cold start of {fresh.id} was cancelled: {exc}") from exc
        self._egress_or_return(entry, sandbox)
        # Never paused, so never resumed: a resume (of a running entry) gives it a serving
        # sandbox's CPU share.
        self.substrate(template.substrate).resume(entry.id, entry.handle)
        self.observer.cold_started(template.name)
        return entry

    # -- egress -------------------------------------------------------------------------------

    def set_egress(self, entry: EntryRecord, policy: EgressPolicy | None) -> None:
        self.substrate(entry.substrate).egress.set(entry.ip, policy)

    def _egress_or_return(self, entry: EntryRecord, sandbox: SandboxRecord | None) -> None:
        """Give a handed-out entry its sandbox's rules; one that cannot have them is not
        handed out (it goes back, and the caller hears why)."""
        if sandbox is None or sandbox.egress is None:
            return
        try:
            self.set_egress(entry, sandbox.egress)
        except CoppiceError:
            with contextlib.suppress(IllegalTransition, EntryNotFound):
                self.perform(self.store.apply(entry.id, Event.RETURN, "egress rules failed"))
            raise

    def restore_egress(self) -> None:
        """Make every substrate's firewall hold exactly the rules of the sandboxes in the
        store (a restart, a host whose tables were flushed)."""
        wanted: dict[str, dict[str, EgressPolicy]] = {name: {} for name in self.substrates}
        for handed in self.store.list_sandboxes():
            if handed.sandbox.egress is not None and handed.entry.substrate in wanted:
                wanted[handed.entry.substrate][handed.entry.ip] = handed.sandbox.egress
        for name, policies in wanted.items():
            self.substrate(name).egress.reset(policies)

    def return_entry(self, entry_id: str) -> EntryRecord | None:
        """Destroy the entry and (unless a keeper refills instead) start its replacement."""
        return self.perform(self.store.apply(entry_id, Event.RETURN), self.respawn)

    def pause_entry(self, entry_id: str) -> EntryRecord:
        """Suspend the sandbox with its memory; where the driver writes that to disk (a VM),
        only if it fits the disk budget."""
        entry = self.store.get(entry_id)
        sub = self.substrate(entry.substrate)
        kept = 0
        if sub.persistence.memory_pause_survives_reboot:
            kept = sub.footprint(entry.id, entry.handle, keep_memory=True)
        budget = self.settings.snapshot_disk_mb * MB
        applied = self.store.pause_kept(entry_id, Event.PAUSE, kept, budget)
        self.perform(applied)
        return applied.entry

    def pause_files_entry(self, entry_id: str) -> EntryRecord:
        """Stop the sandbox's processes and keep its files, if they fit the disk budget."""
        entry = self.store.get(entry_id)
        sub = self.substrate(entry.substrate)
        if not sub.persistence.files_only_pause:
            # Refused before the store moves: the sandbox keeps running as it was.
            raise files_only_pause_refused(sub.name)
        kept = sub.footprint(entry.id, entry.handle, keep_memory=False)
        budget = self.settings.snapshot_disk_mb * MB
        applied = self.store.pause_kept(entry_id, Event.PAUSE_FILES, kept, budget)
        self.perform(applied)
        return applied.entry

    def resume_entry(self, entry_id: str) -> EntryRecord:
        """Thaw a frozen sandbox, or start a files-only paused one's processes again on its
        kept files (returning once they answer)."""
        entry = self.store.get(entry_id)
        sub = self.substrate(entry.substrate)
        stopped = entry.state is State.PAUSED_FILES
        there = (
            sub.has_files(entry.id, entry.handle)
            if stopped
            else sub.is_alive(entry.id, entry.handle)
        )
        if not there:
            buried = self.record_death(entry, "resume")
            if buried is not None:
                self.perform(buried.applied, self.respawn)
            raise SandboxDied(entry.id, "its kept files are gone" if stopped else "")
        applied = self.store.apply(entry_id, Event.RESUME)
        self.perform(applied)
        return self.store.get(entry_id)

    def _wake(self, entry: EntryRecord) -> None:
        sub = self.substrate(entry.substrate)
        template = self.store.get_template(entry.template)
        self._ensure_host(sub)  # after a reboot, a VM woken from disk needs its bridge again
        handle = sub.wake(self._spec(entry, template), entry.handle)
        if handle != entry.handle:
            self.store.set_handle(entry.id, handle)

    def _start_processes(self, entry: EntryRecord) -> None:
        """RESUMING: start the processes on the kept files and wait for them to answer; if
        they do not, the sandbox is stopped again and stays paused with its files."""
        sub = self.substrate(entry.substrate)
        try:
            template = self.store.get_template(entry.template)
            spec = self._spec(entry, template)
            handle = sub.start_processes(spec, entry.handle)
            self.store.set_handle(entry.id, handle)
            wait_s = template.policy.ready_timeout_s or self.settings.ready_timeout_s
            sub.wait_ready(spec, handle, wait_s)
        except (CoppiceError, OSError) as exc:
            error = exc if isinstance(exc, CoppiceError) else SubstrateError(str(exc))
            with contextlib.suppress(IllegalTransition, EntryNotFound):
                self.perform(self.store.apply(entry.id, Event.FAIL, str(error)))
            raise SubstrateError(
                f"sandbox {entry.id} did not start again on its kept files: {error}; "
                "it is still paused with them, so connect again to retry"
            ) from exc
        self.store.apply(entry.id, Event.READY, "processes started on kept files")

    def available_count(self, template_name: str) -> int:
        """Entries warm in the pool now, ready for checkout."""
        self.store.get_template(template_name)
        return sum(1 for e in self.store.list_entries(template_name) if e.state is State.AVAILABLE)

    def pool_size(self, template_name: str) -> int:
        """Entries that are, or are about to be, available for checkout."""
        return sum(
            1
            for e in self.store.list_entries(template_name)
            if e.state in (State.AVAILABLE, State.WARMING)
        )

    def drain(self, template_name: str) -> int:
        self.store.get_template(template_name)
        drained = 0
        deadline = time.monotonic() + 2 * self.settings.ready_timeout_s
        while True:
            entries = self.store.list_entries(template_name)
            if not entries:
                return drained
            waiting = False
            for e in entries:
                if self._owned_by_live_other(e) and time.monotonic() < deadline:
                    waiting = True  # another process is still warming or tearing it down
                    continue
                try:
                    self.perform(self.store.apply(e.id, Event.DRAIN))
                    drained += 1
                except (EntryNotFound, IllegalTransition):
                    continue
            if waiting:
                time.sleep(0.05)

    def list(self, template_name: str | None = None) -> list[EntryRecord]:
        return self.store.list_entries(template_name)

    def _owned_by_live_other(self, e: EntryRecord) -> bool:
        transient = e.state in (State.WARMING, State.RETURNING, State.FAILED)
        return transient and self._owner_alive_elsewhere(e)

    def _owner_running(self, e: EntryRecord) -> bool:
        """The entry's owner is running: this process (a long-lived service reconciles while
        its own threads are still warming or tearing entries down) or another one."""
        if e.owner_pid is None or e.owner_start is None:
            return False
        owner = ProcessIdentity(e.owner_pid, e.owner_start)
        return owner == self.store.owner or owner.is_running()

    def _owner_alive_elsewhere(self, e: EntryRecord) -> bool:
        """The entry's owner is a running process other than this one."""
        if e.owner_pid is None or e.owner_start is None:
            return False
        owner = ProcessIdentity(e.owner_pid, e.owner_start)
        return owner != self.store.owner and owner.is_running()

    # -- deaths -------------------------------------------------------------------------------

    def record_death(self, seen: EntryRecord, noticed_by: str) -> Buried | None:
        """`seen` was found dead: read what it left (before any teardown removes it), say
        why it died, and commit that with its DIED; the caller performs the teardown the
        returned transition asks for. None if someone else dealt with it meanwhile. Only a
        handed-out sandbox is examined: a pool entry dying is a warm pool's own affair."""
        sub = self.substrate(seen.substrate)
        if seen.state not in HANDED_OUT:
            applied = self.store.apply_if_unchanged(seen, Event.DIED, f"found dead by {noticed_by}")
            return None if applied is None else Buried(applied, None)
        memory_mb: int | None
        try:
            memory_mb = self._limits(self.store.get_template(seen.template)).memory_mb
        except CoppiceError:
            memory_mb = None  # its template was removed since
        with self._examining:
            found = self.post_mortem.examine(sub, seen.id)
            why = deaths.diagnose(found, seen.created_at, self.boot_time(), memory_mb)
            buried = self.store.bury(seen, why.reason.value, why.detail, found.console_tail)
        if buried is None:
            return None
        log.warning(
            "sandbox %s (%s) died, found by %s: %s: %s",
            seen.id,
            seen.template,
            noticed_by,
            why.reason.value,
            why.detail,
        )
        self.observer.sandbox_died(seen.id, seen.template, why.reason.value, why.oom_kills)
        return buried

    # -- actions ------------------------------------------------------------------------------

    def perform(self, applied: Applied, respawn: bool = True) -> EntryRecord | None:
        """Carry out a transition's actions; returns the replacement entry if one was made.

        With `respawn` false the RESPAWN action is left to whoever keeps the pool at size.
        """
        entry = applied.entry
        replacement: EntryRecord | None = None
        for action in applied.actions:
            sub = self.substrate(entry.substrate)
            if action is Action.RESUME:
                sub.resume(entry.id, entry.handle)
            elif action is Action.PAUSE:
                sub.pause(entry.id, entry.handle)
            elif action is Action.END_CAPTURE:
                sub.end_capture(entry.id, entry.handle)
            elif action is Action.SUSPEND:
                self.store.set_handle(entry.id, sub.suspend(entry.id, entry.handle))
            elif action is Action.WAKE:
                self._wake(entry)
            elif action is Action.STOP_PROCESSES:
                sub.stop_processes(entry.id, entry.handle)
            elif action is Action.START_PROCESSES:
                self._start_processes(entry)
            elif action is Action.DESTROY:
                # The address goes to the next entry: it must not inherit this one's rules.
                try:
                    sub.egress.set(entry.ip, None)
                except CoppiceError as exc:
                    log.warning("cannot clear the egress rules of %s: %s", entry.id, exc)
                sub.destroy(entry.id, entry.handle)
                self.store.apply(entry.id, Event.DESTROYED)
            elif action is Action.RESPAWN:
                if not respawn:
                    continue
                try:
                    template = self.store.get_template(entry.template)
                except CoppiceError:
                    continue  # its template was removed; nothing to respawn from
                (fresh,) = self._reserve(template, 1)
                replacement = self._bring_up(template, fresh)
        return replacement

    # -- reconcile ----------------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        report = ReconcileReport()
        host_ids: set[str] = set()
        for sub in self.substrates.values():
            host_ids |= sub.host_objects().all_ids()
        snapshot_dirs = self._snapshot_dirs()
        observations = []
        for e in self.store.list_entries():
            observations.append(self._observe(e))
        snapshots = [
            reconcile_rules.SnapshotObservation(s, self._snapshot_owner_running(s))
            for s in self.store.list_snapshots()
        ]
        decided = reconcile_rules.plan(
            observations, host_ids, time.time(), snapshots, snapshot_dirs
        )
        if decided.dead or decided.orphaned:
            # After a host reboot the bridge and cgroup parents are gone with the entries;
            # put them back before replacements are started.
            for sub in self.substrates.values():
                self._attempt(
                    report, f"host set-up of {sub.name}", functools.partial(self._prepare, sub)
                )
        for e in decided.dead + decided.orphaned:
            self._fix(e, report)
        for e in decided.kept:
            self._attempt(report, f"paused {e.id}", functools.partial(self._keep_files, e, report))
        for e in decided.interrupted:
            self._attempt(
                report, f"interrupted {e.id}", functools.partial(self._put_back, e, report)
            )
        for snap in decided.abandoned_snapshots:
            self._attempt(
                report,
                f"half-made snapshot {snap.id}",
                functools.partial(self._remove_snapshot, snap, report),
            )
        for name in decided.snapshot_leftovers:
            self._remove_snapshot_dir(self.settings.snapshots_dir / name)
            report.leftovers_removed.append(name)
        for entry_id in decided.leftovers:
            for sub in self.substrates.values():
                self._attempt(
                    report, f"leftover {entry_id}", functools.partial(sub.destroy, entry_id, None)
                )
            report.leftovers_removed.append(entry_id)
        return report

    def _observe(self, e: EntryRecord) -> reconcile_rules.Observation:
        known = self.substrates.get(e.substrate)
        if known is None:
            return reconcile_rules.Observation(e, False, self._owner_running(e))
        alive = e.state is not State.PAUSED_FILES and known.is_alive(e.id, e.handle)
        # Only a paused sandbox without processes is asked: its files decide if it stays.
        asks = e.state is State.PAUSED_FILES or (e.state is State.PAUSED and not alive)
        has_files = asks and known.has_files(e.id, e.handle)
        return reconcile_rules.Observation(e, alive, self._owner_running(e), has_files)

    def _snapshot_dirs(self) -> set[str]:
        try:
            return {p.name for p in self.settings.snapshots_dir.iterdir()}
        except FileNotFoundError:
            return set()

    def _snapshot_owner_running(self, snap: SnapshotRecord) -> bool:
        if snap.owner_pid is None or snap.owner_start is None:
            return False
        owner = ProcessIdentity(snap.owner_pid, snap.owner_start)
        return owner == self.store.owner or owner.is_running()

    def _keep_files(self, e: EntryRecord, report: ReconcileReport) -> None:
        """A frozen sandbox lost its processes (and memory) to a host reboot; its files are
        there, so it stays paused with them and its next resume starts it on them."""
        sub = self.substrate(e.substrate)
        kept = sub.footprint(e.id, e.handle, keep_memory=False)
        if self.store.processes_lost(e, kept) is not None:
            log.warning("sandbox %s lost its memory (host reboot); kept paused with files", e.id)
            report.kept_paused.append(e.id)

    def _put_back(self, e: EntryRecord, report: ReconcileReport) -> None:
        """A resume or a capture whose process is gone: undone, the sandbox as it was."""
        event = Event.FAIL if e.state is State.RESUMING else Event.SNAPSHOT_DONE
        applied = self.store.apply_if_unchanged(e, event, "its owner is gone")
        if applied is not None:
            self.perform(applied, self.respawn)
            report.put_back.append(e.id)

    def _remove_snapshot(self, snap: SnapshotRecord, report: ReconcileReport) -> None:
        self.substrate(snap.substrate).delete_snapshot(Path(snap.path))
        self.store.delete_snapshot(snap.id)
        report.snapshots_removed.append(snap.id)

    def _remove_snapshot_dir(self, directory: Path) -> None:
        """A directory no snapshot row names (a crash between removing its files and its
        row): whichever driver can delete snapshots removes it."""
        for sub in self.substrates.values():
            try:
                sub.delete_snapshot(directory)
            except CoppiceError:
                continue
            if not directory.exists():
                return

    def _fix(self, e: EntryRecord, report: ReconcileReport) -> None:
        def run() -> None:
            buried = self.record_death(e, "reconcile")
            if buried is None:
                return  # someone else dealt with it meanwhile
            replacement = self.perform(buried.applied, self.respawn)
            if replacement is not None:
                report.replaced.append(f"{e.id} -> {replacement.id}")
            else:
                report.finished_teardowns.append(e.id)

        self._attempt(report, f"entry {e.id}", run)

    @staticmethod
    def _attempt(report: ReconcileReport, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except CoppiceError as exc:
            report.problems.append(f"{what}: {exc}")
