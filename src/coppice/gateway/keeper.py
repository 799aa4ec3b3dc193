"""The service's background duties, on threads of their own so no request waits for them:
keep every configured pool at its target size, tear down killed sandboxes, act on expired
timeouts (kill, or pause when the sandbox asked for auto-pause), notice sandboxes that died
(and say why), and reconcile now and then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from coppice.errors import CoppiceError, EntryNotFound, IllegalTransition
from coppice.gateway.notices import SandboxNotices
from coppice.lifecycle import Event, State
from coppice.pool.controller import PoolController
from coppice.store.records import EntryRecord, TombstoneRecord
from coppice.store.store import Applied

log = logging.getLogger("coppice.keeper")
#: the longest a template whose warms keep failing waits before the next attempt
MAX_BACKOFF_S = 60.0
#: how often handed-out sandboxes are checked for a death (a /proc read each)
WATCH_EVERY_S = 1.0
#: how often running sandboxes' OOM counters are read (a cgroup file each)
OOM_READ_EVERY_S = 5.0


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
        self._warms: dict[str, Future[None]] = {}
        self._warm_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="refill")
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
        running = self._warms.get(template)
        if running is not None:
            # A refill under way may have read the old version: let its entries land first.
            wait([running])
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

    def targets(self) -> dict[str, int]:
        """Every pool to keep at size: the configured ones, and templates that carry a
        target of their own (built through the build API)."""
        found = {
            t.name: t.policy.pool_target
            for t in self.store.list_templates()
            if t.policy.pool_target is not None
        }
        return {**found, **self.configured}

    def refill(self) -> None:
        now = time.monotonic()
        for template, target in self.targets().items():
            running = self._warms.get(template)
            if running is not None and not running.done():
                continue
            with self._lock:
                backoff = self._backoff.get(template)
            if backoff is not None and now < backoff[0]:
                continue
            try:
                missing = target - self.controller.pool_size(template)
            except CoppiceError:
                continue
            if missing > 0:
                self._warms[template] = self._warm_pool.submit(self._warm, template, missing)

    def _warm(self, template: str, count: int) -> None:
        try:
            report = self.controller.warm(template, count)
        except CoppiceError as exc:
            log.warning("refilling %s: %s", template, exc)
            self._failed(template)
            return
        for failure in report.failures:
            log.warning("refilling %s: %s", template, failure)
        if report.failures and not report.started:
            self._failed(template)
        else:
            with self._lock:
                self._backoff.pop(template, None)
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
                else:
                    applied = self.store.apply(sandbox_id, Event.RETURN, "timeout expired")
                    self.teardown(applied)
                acted.append(sandbox_id)
            except (EntryNotFound, IllegalTransition):
                continue  # killed or paused by someone else meanwhile
            except CoppiceError as exc:
                log.warning("timeout of sandbox %s: %s", sandbox_id, exc)
        return acted

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
