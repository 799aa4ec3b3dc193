"""The service's background duties, on threads of their own so no request waits for them:
keep every pool at the size its demand asks for (`pool.demand`), one entry per spawn slot
and only while no create waits for a slot, tear down killed sandboxes, act on expired
timeouts (kill, or pause when the sandbox asked for auto-pause), notice sandboxes that died
(and say why), and reconcile now and then.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from coppice.errors import CoppiceError, DiskBudgetExceeded, EntryNotFound, IllegalTransition
from coppice.gateway.admission import AdmissionQueue, SpawnSlots
from coppice.gateway.host_room import HostRoom
from coppice.gateway.notices import SandboxNotices
from coppice.lifecycle import Event, State
from coppice.pool import demand
from coppice.pool.controller import PoolController
from coppice.store.records import EntryRecord, PoolTargetRecord, TombstoneRecord
from coppice.store.store import Applied

log = logging.getLogger("coppice.keeper")
#: the longest a template whose warms keep failing waits before the next attempt
MAX_BACKOFF_S = 60.0
#: how often handed-out sandboxes are checked for a death (a /proc read each)
WATCH_EVERY_S = 1.0
#: how often running sandboxes' OOM counters are read (a cgroup file each)
OOM_READ_EVERY_S = 5.0
#: entries a pool sheds per pass when its demand has fallen: it shrinks over a few seconds
SHRINK_PER_PASS = 4


def default_spawn_slots() -> int:
    return 2 * max(1, len(os.sched_getaffinity(0)))


class PoolKeeper:
    def __init__(
        self,
        controller: PoolController,
        targets: dict[str, int],
        tick_s: float = 0.5,
        reconcile_every_s: float = 30.0,
        notices: SandboxNotices | None = None,
        on_tick: Callable[[float], None] | None = None,
        oom_every_s: float = OOM_READ_EVERY_S,
    ) -> None:
        """`on_tick`: something else the keeper's loop does each pass (metrics readings);
        `oom_every_s`: how often `watch` reads running sandboxes' OOM counters."""
        self.controller = controller
        self.store = controller.store
        #: what pool_targets says; templates it does not name keep their own pool_target
        self.configured = targets
        self.tick_s = tick_s
        self.reconcile_every_s = reconcile_every_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        settings = controller.settings
        #: creates waiting for an entry; their order and the slots they share with refills
        self.admission = AdmissionQueue(settings.admission_queue_max)
        self.slots = SpawnSlots(
            settings.spawn_slots or default_spawn_slots(),
            held_back=lambda: self.admission.waiting() > 0,
            on_release=self.admission.wake,
        )
        self.room = HostRoom(controller)
        self.demand = demand.DemandSettings(
            maximum=settings.pool_max, remember_s=settings.pool_burst_memory_s
        )
        #: each template's recent creates (unix times, ascending), what its target follows
        self._creates: dict[str, deque[float]] = {}
        #: each pool's target as last decided, with why
        self._decided: dict[str, demand.Target] = {}
        #: the waiting count last written beside each decision
        self._told: dict[str, int] = {}
        #: refills submitted and not finished, per template
        self._pending: Counter[str] = Counter()
        self._warm_pool = ThreadPoolExecutor(
            max_workers=self.slots.count, thread_name_prefix="refill"
        )
        self._teardowns = ThreadPoolExecutor(max_workers=4, thread_name_prefix="teardown")
        self._last_reconcile = time.monotonic()
        self._last_watch = 0.0
        self._last_oom_read = 0.0
        self.oom_every_s = oom_every_s
        self.notices = notices or SandboxNotices()
        self.on_tick = on_tick
        #: templates whose warms failed: (monotonic time to try again, the delay used)
        self._backoff: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    # -- control --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pool-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop deciding, and let the work in flight finish: a warm half-done would leave an
        entry for the next start's reconcile, a teardown half-done a sandbox running."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._warm_pool.shutdown(wait=True, cancel_futures=True)
        self._teardowns.shutdown(wait=True)

    def wake(self) -> None:
        self._wake.set()

    def teardown(self, applied: Applied) -> None:
        """The sandbox is over (its RETURN is committed): say so, then tear down behind."""
        self.notices.ended(applied.entry.id)
        self._teardowns.submit(self._guarded, "teardown", applied.entry.id, applied)

    def template_changed(self, template: str) -> list[str]:
        """A new version of `template` was built: its available entries, which run the old
        one, are torn down and the refill warms the new one in their place. Sandboxes in use
        keep the version they started with. Returns the entries replaced."""
        # A refill under way may have read the old version: let its entries land first.
        deadline = time.monotonic() + 2 * self.controller.settings.ready_timeout_s
        while self.pending(template) and time.monotonic() < deadline:
            time.sleep(0.02)
        replaced = []
        for entry in self.store.list_entries(template):
            if entry.state is not State.AVAILABLE:
                continue
            try:
                applied = self.store.apply_if_unchanged(entry, Event.DRAIN, "template rebuilt")
            except (EntryNotFound, IllegalTransition):
                continue
            if applied is None:
                continue  # checked out meanwhile: it serves the old version to its caller
            self._teardowns.submit(self._guarded, "replacement", entry.id, applied)
            replaced.append(entry.id)
        self._wake.set()
        return replaced

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.reap(time.time())
                if time.monotonic() - self._last_watch >= WATCH_EVERY_S:
                    self._last_watch = time.monotonic()
                    self.watch()
                self.refill()
                if self.on_tick is not None:
                    self.on_tick(time.time())
                if time.monotonic() - self._last_reconcile > self.reconcile_every_s:
                    self._last_reconcile = time.monotonic()
                    report = self.controller.reconcile()
                    for problem in report.problems:
                        log.warning("reconcile: %s", problem)
                    self.prune_tombstones(time.time())
            except Exception:
                log.exception("pool keeper pass failed; retrying on the next tick")
            self._wake.wait(self.tick_s)

    def bases(self) -> dict[str, int]:
        """Every pool's configured size: the configured ones (pool_targets), and templates
        that carry a target of their own (built through the build API)."""
        found = {
            t.name: t.policy.pool_target
            for t in self.store.list_templates()
            if t.policy.pool_target is not None
        }
        return {**found, **self.configured}

    def targets(self) -> dict[str, int]:
        """Every pool's target as last decided (its base until the keeper has looked)."""
        with self._lock:
            decided = {t: d.count for t, d in self._decided.items()}
        return {**self.bases(), **decided}

    def decisions(self) -> dict[str, demand.Target]:
        with self._lock:
            return dict(self._decided)

    def pending(self, template: str) -> int:
        with self._lock:
            return self._pending[template]

    def record_create(self, template: str, at: float | None = None) -> None:
        """A create asked for `template` (served from the pool or not): demand to follow."""
        with self._lock:
            self._creates.setdefault(template, deque()).append(time.time() if at is None else at)
        self._wake.set()

    def decide(self, template: str, base: int, now: float) -> demand.Target:
        with self._lock:
            creates = self._creates.setdefault(template, deque())
            demand.forget_before(creates, now, self.demand)
            seen = list(creates)
        room = self.room.warm_entries_room(template)
        decided = demand.target(base, seen, now, self.demand, room)
        waiting = self.admission.waiting(template)
        with self._lock:
            before = self._decided.get(template)
            self._decided[template] = decided
            if not creates and decided.count == 0:
                self._creates.pop(template, None)
            told = self._told.get(template)
            self._told[template] = waiting
        if before != decided or told != waiting:
            # For `coppice pool list`, which runs in a process of its own.
            self.store.set_pool_target(
                PoolTargetRecord(
                    template, decided.count, decided.describe(), decided.wanted, waiting, now
                )
            )
        return decided

    def refill(self) -> None:
        """Bring every pool toward its target: one refill per free spawn slot (none while a
        create waits for a slot), and shed what a pool holds beyond it."""
        now = time.time()
        bases = self.bases()
        with self._lock:
            templates = sorted(set(bases) | set(self._creates) | set(self._decided))
        for template in templates:
            with self._lock:
                backoff = self._backoff.get(template)
            if backoff is not None and time.monotonic() < backoff[0]:
                continue
            try:
                available = self.controller.available_count(template)
                substrate = self.store.get_template(template).substrate
            except CoppiceError:
                continue  # removed meanwhile
            target = self.decide(template, bases.get(template, 0), now).count
            missing = target - available - self.pending(template)
            if missing < 0:
                self._shrink(template, min(-missing, SHRINK_PER_PASS))
            while (
                missing > 0
                and self.room.can_start(substrate) is None
                and self.slots.try_for_refill()
            ):
                with self._lock:
                    self._pending[template] += 1
                missing -= 1
                self._warm_pool.submit(self._warm, template)

    def _shrink(self, template: str, count: int) -> None:
        """Tear down `count` of the pool's available entries, the longest-waiting first."""
        for entry in self.store.list_entries(template):
            if count <= 0:
                return
            if entry.state is not State.AVAILABLE:
                continue
            try:
                applied = self.store.apply_if_unchanged(entry, Event.DRAIN, "demand fell")
            except (EntryNotFound, IllegalTransition):
                continue
            if applied is not None:
                self._teardowns.submit(self._guarded, "shrink", entry.id, applied)
                count -= 1

    def _warm(self, template: str) -> None:
        """One refill in a spawn slot the caller claimed."""
        started = False
        try:
            report = self.controller.warm(template, 1)
            started = bool(report.started)
            for failure in report.failures:
                log.warning("refilling %s: %s", template, failure)
            if started:
                with self._lock:
                    self._backoff.pop(template, None)
            else:
                self._failed(template)
        except CoppiceError as exc:
            log.warning("refilling %s: %s", template, exc)
            self._failed(template)
        finally:
            with self._lock:
                self._pending[template] -= 1
            self.slots.release()
            if started:
                self.admission.supplied()
            self._wake.set()

    def _failed(self, template: str) -> None:
        """Nothing of `template` came up: try again later, and later still each time, so a
        template whose entries cannot start (a start command that fails) does not keep the
        host's CPUs busy warming it."""
        with self._lock:
            _, delay = self._backoff.get(template, (0.0, 0.0))
            delay = min(MAX_BACKOFF_S, max(1.0, delay * 2))
            self._backoff[template] = (time.monotonic() + delay, delay)
        log.warning("refilling %s again in %.0f s", template, delay)

    def backoff_s(self, template: str) -> float:
        """How long the keeper waits before it warms `template` again (0: it does not)."""
        with self._lock:
            found = self._backoff.get(template)
        return 0.0 if found is None else max(0.0, found[0] - time.monotonic())

    def reap(self, now: float) -> list[str]:
        """Sandboxes whose timeout passed: killed, or paused if they asked for that."""
        acted = []
        for handed in self.store.expired_sandboxes(now):
            sandbox_id = handed.sandbox.id
            try:
                if handed.sandbox.on_timeout == "pause":
                    self.controller.pause_entry(sandbox_id)
                    self.notices.changed(sandbox_id)
                elif handed.sandbox.on_timeout == "pause_files":
                    self._pause_files_or_freeze(sandbox_id)
                    self.notices.changed(sandbox_id)
                else:
                    applied = self.store.apply(sandbox_id, Event.RETURN, "timeout expired")
                    self.teardown(applied)
                acted.append(sandbox_id)
            except (EntryNotFound, IllegalTransition):
                continue  # killed or paused by someone else meanwhile
            except CoppiceError as exc:
                log.warning("timeout of sandbox %s: %s", sandbox_id, exc)
        return acted

    def _pause_files_or_freeze(self, sandbox_id: str) -> None:
        """A timeout's files-only pause; past the disk budget the sandbox is frozen instead
        (its state kept while the host runs) rather than retried on every pass."""
        try:
            self.controller.pause_files_entry(sandbox_id)
        except DiskBudgetExceeded as exc:
            log.warning("timeout of %s: %s; froze it instead", sandbox_id, exc)
            self.controller.pause_entry(sandbox_id)

    def watch(self) -> list[str]:
        """Handed-out sandboxes whose processes are gone are recorded dead, with why, and
        torn down; every few seconds, the OOM kills of the running ones are counted. Returns
        the sandboxes found dead."""
        read_oom = time.monotonic() - self._last_oom_read >= self.oom_every_s
        if read_oom:
            self._last_oom_read = time.monotonic()
        dead = []
        for handed in self.store.list_sandboxes():
            entry = handed.entry
            if entry.state in (State.PAUSED_FILES, State.RESUMING):
                continue  # no processes to watch (yet): reconcile checks their files
            try:
                sub = self.controller.substrate(entry.substrate)
            except CoppiceError:
                continue  # a driver this host lacks: reconcile reports it
            if not sub.is_alive(entry.id, entry.handle):
                if self.bury(entry, "the keeper") is not None:
                    dead.append(entry.id)
                continue
            if read_oom and entry.state is State.IN_USE:
                counted = self.controller.post_mortem.oom_counters(sub, entry.id)
                if counted is not None:
                    self.controller.observer.oom_kills_seen(
                        entry.id, entry.template, counted.oom_kills
                    )
        return dead

    def bury(self, entry: EntryRecord, noticed_by: str) -> TombstoneRecord | None:
        """`entry` was found dead: record why, end what relays to it, tear it down behind.
        None if it was not a handed-out sandbox, or someone else dealt with it first."""
        try:
            buried = self.controller.record_death(entry, noticed_by)
        except CoppiceError as exc:
            log.warning("recording the death of %s: %s", entry.id, exc)
            return None
        if buried is None:
            return None
        self.teardown(buried.applied)
        return buried.tombstone

    def prune_tombstones(self, now: float) -> int:
        """Forget the deaths older than `dead_sandbox_keep_s`."""
        return self.store.prune_tombstones(now - self.controller.settings.dead_sandbox_keep_s)

    def _guarded(self, what: str, entry_id: str, applied: Applied) -> None:
        try:
            self.controller.perform(applied, respawn=False)
        except CoppiceError as exc:
            log.warning("%s of %s failed (reconcile will retry): %s", what, entry_id, exc)
        self._wake.set()
