"""What the control plane does to sandboxes, as plain synchronous calls on the store and the
pool controller. The ASGI layer runs these in worker threads; nothing here knows HTTP."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, replace

from coppice.config import Limits, Settings
from coppice.egress_policy import EgressPolicy
from coppice.errors import (
    CapacityExceeded,
    Conflict,
    CoppiceError,
    DeathNotice,
    EntryNotFound,
    IllegalTransition,
    NotFound,
    NotSupportedYet,
    PoolExhausted,
    SandboxDied,
    SandboxNotFound,
    SnapshotNotFound,
    TemplateNotFound,
)
from coppice.gateway.admission import Refusal
from coppice.gateway.auth import Principal
from coppice.gateway.catalog import TemplateCatalog
from coppice.gateway.keeper import PoolKeeper
from coppice.gateway.service_metrics import ServiceMetrics
from coppice.gateway.snapshots import find_snapshot, names_a_snapshot
from coppice.gateway.wire import PAUSED_STATES, CreateRequest, ListQuery, encode_token, state_of
from coppice.lifecycle import INTERRUPTIBLE_STATES, Event, State
from coppice.pool.controller import PoolController
from coppice.pool.snapshots import SnapshotController
from coppice.store.records import (
    EntryRecord,
    HandedOut,
    SandboxRecord,
    SnapshotRecord,
    TemplateRecord,
    TombstoneRecord,
)


@dataclass(frozen=True)
class Page:
    items: list[HandedOut]
    next_token: str | None
    #: running sandboxes matching the filters before paging (None: running not asked for)
    total_running: int | None = None


class SandboxService:
    def __init__(
        self,
        settings: Settings,
        controller: PoolController,
        keeper: PoolKeeper,
        catalog: TemplateCatalog,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.controller = controller
        self.snapshots = SnapshotController(controller)
        self.store = controller.store
        self.keeper = keeper
        self.catalog = catalog
        self.metrics = metrics or ServiceMetrics()

    def limits(self, template: str) -> Limits:
        """The limits sandboxes of `template` run with (as it was built)."""
        try:
            policy = self.store.get_template(template).policy
        except TemplateNotFound:
            return self.settings.limits  # removed since; its sandboxes had the defaults
        return policy.limits or self.settings.limits

    # -- create ---------------------------------------------------------------------------------

    def create(
        self, req: CreateRequest, who: Principal, idempotency_key: str | None
    ) -> tuple[HandedOut, bool]:
        """Hand out a sandbox, from a template or (its `templateID` naming one) a snapshot;
        the flag says whether it is new (False: an idempotent repeat)."""
        template, snapshot = self._template_or_snapshot(who, req.template_id)
        if idempotency_key:
            earlier = self.store.find_idempotent(who.tenant, idempotency_key)
            if earlier is not None:
                return earlier, False
        record = self._new_record(req, who, idempotency_key)
        if snapshot is not None:
            entry = self._start_from_snapshot(template, snapshot, record)
            handed = self.store.get_sandbox(entry.id)
            if handed is None:  # killed between its start and here
                raise SandboxNotFound(entry.id)
            return handed, True
        self.keeper.record_create(template.name)
        try:
            entry = self.controller.checkout(template.name, record)
        except PoolExhausted as exc:
            entry = self._wait_for_entry(template, record, exc)
        finally:
            self.keeper.wake()  # the pool just shrank (or tried to): refill
        handed = self.store.get_sandbox(entry.id)
        if handed is None:  # killed between checkout and here
            raise SandboxNotFound(entry.id)
        return handed, True

    def _template_or_snapshot(
        self, who: Principal, template_id: str
    ) -> tuple[TemplateRecord, SnapshotRecord | None]:
        """A template's name or alias, else one of the caller's snapshots."""
        try:
            return self.catalog.resolve(template_id), None
        except NotFound:
            snapshot = find_snapshot(self.store, who.tenant, template_id)
            if snapshot is None:
                if names_a_snapshot(template_id):
                    raise SnapshotNotFound(template_id) from None
                raise
        try:
            return self.store.get_template(snapshot.template), snapshot
        except TemplateNotFound:
            raise SnapshotNotFound(template_id) from None

    def _new_record(
        self, req: CreateRequest, who: Principal, idempotency_key: str | None
    ) -> SandboxRecord:
        now = time.time()
        return SandboxRecord(
            id="",
            template_id=req.template_id,
            tenant=who.tenant,
            access_token=secrets.token_urlsafe(24),
            env_vars=req.env_vars,
            metadata=req.metadata,
            started_at=now,
            end_at=now + req.timeout_s,
            timeout_s=req.timeout_s,
            on_timeout=req.on_timeout,
            auto_resume=req.auto_resume,
            idempotency_key=idempotency_key or None,
            traffic_token=None if req.public_traffic else secrets.token_urlsafe(24),
            egress=req.egress,
        )

    def _start_from_snapshot(
        self, template: TemplateRecord, snapshot: SnapshotRecord, record: SandboxRecord
    ) -> EntryRecord:
        """No pool holds a snapshot's sandboxes: wait in line (the snapshot's own) for a
        spawn slot, as a cold start does, and start it there."""
        admission, slots = self.keeper.admission, self.keeper.slots
        line = f"{template.name}@{snapshot.id}"
        got = admission.serve(
            line,
            self.settings.admission_deadline_s,
            lambda: True if slots.try_for_request() else None,
            lambda: self.keeper.room.can_start(template.substrate),
        )
        if isinstance(got, Refusal):
            self.metrics.rejected(template.name, got.reason)
            raise PoolExhausted(line, got.retry_after_s, got.message)
        try:
            return self.snapshots.start_from(snapshot, record)
        except CapacityExceeded as exc:
            self.metrics.rejected(template.name, "at_capacity")
            raise PoolExhausted(line, 2.0, str(exc)) from exc
        finally:
            slots.release()

    def _wait_for_entry(
        self, template: TemplateRecord, record: SandboxRecord, empty: PoolExhausted
    ) -> EntryRecord:
        """The pool was empty: wait in line for an entry that lands in the pool or for a
        spawn slot to start one in, whichever comes first; a 429 only when waiting cannot
        help (the host is full, or the wait would pass the admission deadline)."""
        if not self.settings.cold_start or not template.policy.cold_start:
            self.metrics.rejected(template.name, "cold_start_off")
            raise empty
        admission, slots = self.keeper.admission, self.keeper.slots

        def attempt() -> EntryRecord | bool | None:
            try:
                return self.controller.checkout(template.name, record)
            except PoolExhausted:
                pass
            return True if slots.try_for_request() else None

        got = admission.serve(
            template.name,
            self.settings.admission_deadline_s,
            attempt,
            lambda: self.keeper.room.can_start(template.substrate),
        )
        if isinstance(got, Refusal):
            self.metrics.rejected(template.name, got.reason)
            raise PoolExhausted(template.name, got.retry_after_s, got.message) from None
        if isinstance(got, EntryRecord):
            return got
        # A slot of our own (the next create in line is at the head already): start one.
        try:
            entry = self.controller.start_cold(template.name, record)
        except CapacityExceeded as exc:
            self.metrics.rejected(template.name, "at_capacity")
            raise PoolExhausted(template.name, 2.0, str(exc)) from exc
        finally:
            slots.release()
        admission.supplied()
        return entry

    # -- read -----------------------------------------------------------------------------------

    def get(self, who: Principal, sandbox_id: str) -> HandedOut:
        """The caller's sandbox; if it is gone, a 404 that says when and why when it died."""
        handed = self.store.get_sandbox(sandbox_id)
        if handed is not None and handed.sandbox.tenant == who.tenant:
            return handed
        died = self._tombstone(sandbox_id) if handed is None else None
        if died is not None and died.tenant == who.tenant:
            raise SandboxNotFound(sandbox_id, _notice(died))
        raise SandboxNotFound(sandbox_id)

    # -- deaths ---------------------------------------------------------------------------------

    def _tombstone(self, sandbox_id: str) -> TombstoneRecord | None:
        since = time.time() - self.settings.dead_sandbox_keep_s
        return self.store.get_tombstone(sandbox_id, since)

    def found_dead(self, handed: HandedOut) -> DeathNotice | None:
        """Traffic found the sandbox's processes gone before the keeper did: record its death
        now (or read it, if someone else just did), so the caller hears why at once."""
        current = self.store.get_sandbox(handed.sandbox.id)  # the relay's copy may be stale
        died = None if current is None else self.keeper.bury(current.entry, "the relay")
        died = died or self._tombstone(handed.sandbox.id)
        return None if died is None else _notice(died)

    def death_of(self, sandbox_id: str, access_token: str) -> DeathNotice | None:
        """Why a sandbox died, for in-sandbox traffic that carries its access token (the
        only proof of ownership such traffic has); None for anyone else, or no death."""
        died = self._tombstone(sandbox_id)
        if died is None or not hmac.compare_digest(
            access_token.encode(), died.access_token.encode()
        ):
            return None
        return _notice(died)

    def page(self, who: Principal, query: ListQuery) -> Page:
        ordered = self.store.list_sandboxes(who.tenant)
        if query.newest_first:
            ordered.reverse()
        templates = self._template_filter(query.template)

        def past_cursor(h: HandedOut) -> bool:
            if query.after is None:
                return True
            key = (h.sandbox.started_at, h.sandbox.id)
            return key < query.after if query.newest_first else key > query.after

        def matches(h: HandedOut) -> bool:
            return (
                (not query.states or state_of(h) in query.states)
                and all(h.sandbox.metadata.get(k) == v for k, v in query.metadata.items())
                and (query.started_after is None or h.sandbox.started_at >= query.started_after)
                and (templates is None or h.entry.template in templates)
            )

        matching = [h for h in ordered if matches(h)]
        total_running = (
            sum(1 for h in matching if state_of(h) == "running") if query.counts_running else None
        )
        page = [h for h in matching if past_cursor(h)]
        items = page[: query.limit]
        token = None
        if len(page) > query.limit:
            last = items[-1].sandbox
            token = encode_token(last.started_at, last.id)
        return Page(items, token, total_running)

    def _template_filter(self, template_id: str | None) -> frozenset[str] | None:
        """The built templates a list filter names (an alias means its template); a name
        nothing resolves to matches no sandbox rather than failing the list."""
        if template_id is None:
            return None
        try:
            return frozenset({self.catalog.resolve(template_id).name})
        except NotFound:
            return frozenset()

    # -- change ---------------------------------------------------------------------------------

    def kill(self, who: Principal, sandbox_id: str) -> None:
        handed = self.get(who, sandbox_id)
        if handed.entry.state in INTERRUPTIBLE_STATES:
            raise Conflict(
                f"sandbox {sandbox_id} is {handed.entry.state.value} (a snapshot, a fork or a "
                "resume is under way); kill it once that is done"
            )
        try:
            applied = self.store.apply(sandbox_id, Event.RETURN, "killed through the API")
        except (EntryNotFound, IllegalTransition):
            raise SandboxNotFound(sandbox_id) from None
        # The sandbox is over as of the commit above; the teardown itself runs behind.
        self.keeper.teardown(applied)

    def fork(
        self, who: Principal, sandbox_id: str, timeout_s: int, count: int
    ) -> list[HandedOut | CoppiceError]:
        """`count` new sandboxes from one capture of the caller's running sandbox, which
        keeps running; one outcome per fork, a sandbox or why it did not start. Each fork
        has its own access token and the source's env vars, metadata and egress rules."""
        handed = self.get(who, sandbox_id)
        if handed.entry.state is not State.IN_USE:
            raise Conflict(
                f"sandbox {sandbox_id} is {handed.entry.state.value.replace('_', ' ')}; "
                "a fork is taken of a running sandbox (connect() to a paused one first)"
            )
        now = time.time()
        source = handed.sandbox
        records = [
            replace(
                source,
                id="",
                access_token=secrets.token_urlsafe(24),
                traffic_token=None if source.traffic_token is None else secrets.token_urlsafe(24),
                started_at=now,
                end_at=now + timeout_s,
                timeout_s=timeout_s,
                on_timeout="kill",
                auto_resume=False,
                idempotency_key=None,
                kept_bytes=0,
            )
            for _ in range(count)
        ]
        results: list[HandedOut | CoppiceError] = []
        for outcome in self.snapshots.fork(sandbox_id, who.tenant, records):
            if outcome.entry is None:
                assert outcome.error is not None
                results.append(outcome.error)
                continue
            forked = self.store.get_sandbox(outcome.entry.id)
            results.append(forked if forked is not None else SandboxNotFound(outcome.entry.id))
        self.keeper.wake()
        return results

    def update_network(self, who: Principal, sandbox_id: str, egress: EgressPolicy | None) -> None:
        """Replace the sandbox's egress rules, in the store (the truth a restart restores)
        and on the host."""
        handed = self.get(who, sandbox_id)
        self.store.set_sandbox_egress(sandbox_id, egress)
        try:
            self.controller.set_egress(handed.entry, egress)
        except CoppiceError:
            self.store.set_sandbox_egress(sandbox_id, handed.sandbox.egress)
            raise

    def set_timeout(self, who: Principal, sandbox_id: str, seconds: int) -> None:
        self.get(who, sandbox_id)
        self.store.set_sandbox_deadline(sandbox_id, time.time() + seconds, seconds)

    def refresh(self, who: Principal, sandbox_id: str, seconds: int) -> None:
        handed = self.get(who, sandbox_id)
        end = max(handed.sandbox.end_at, time.time() + seconds)
        self.store.set_sandbox_deadline(sandbox_id, end, handed.sandbox.timeout_s)

    def pause(self, who: Principal, sandbox_id: str, keep_memory: bool = True) -> None:
        """Freeze the sandbox (memory and processes kept while the host runs), or with
        `keep_memory` false stop its processes and keep its files on disk (it outlives a
        gateway restart and a host reboot, and counts against the disk budget)."""
        handed = self.get(who, sandbox_id)
        if handed.entry.state in PAUSED_STATES:
            raise Conflict(f"sandbox {sandbox_id} is already paused")
        if handed.entry.state is not State.IN_USE:
            raise Conflict(
                f"sandbox {sandbox_id} is {handed.entry.state.value}; pause it once that is done"
            )
        if keep_memory:
            self.controller.pause_entry(sandbox_id)
        else:
            self.controller.pause_files_entry(sandbox_id)
        self.keeper.notices.changed(sandbox_id)

    def resume(
        self, who: Principal, sandbox_id: str, timeout_s: int | None, reboot: bool = False
    ) -> HandedOut:
        handed = self.get(who, sandbox_id)
        if handed.entry.state not in (State.PAUSED, State.PAUSED_FILES):
            raise Conflict(f"sandbox {sandbox_id} is already running")
        return self._wake(handed, timeout_s, reboot)

    def connect(
        self, who: Principal, sandbox_id: str, timeout_s: int | None, reboot: bool = False
    ) -> HandedOut:
        """Resume if paused (a frozen one thaws; a files-only one starts its processes on
        its files); with `timeout_s`, the sandbox lives at least that much longer."""
        handed = self.get(who, sandbox_id)
        if handed.entry.state in (State.PAUSED, State.PAUSED_FILES):
            return self._wake(handed, timeout_s, reboot)
        if timeout_s is not None:
            self.refresh(who, sandbox_id, timeout_s)
        return self.get(who, sandbox_id)

    def _wake(self, handed: HandedOut, timeout_s: int | None, reboot: bool = False) -> HandedOut:
        sandbox_id = handed.sandbox.id
        if reboot and handed.entry.state is State.PAUSED:
            raise NotSupportedYet(
                "resuming a frozen sandbox by a reboot (on_resume='reboot')",
                "connect without it (its memory is there), or pause with keep_memory=False",
            )
        try:
            self.controller.resume_entry(sandbox_id)
        except EntryNotFound:
            raise SandboxNotFound(sandbox_id) from None
        except IllegalTransition:
            # Another request (a connect, traffic auto-resuming it) woke it first: what this
            # caller asked for has happened, so answer as if this one had done it.
            now = self.store.get_sandbox(sandbox_id)
            if now is None:
                raise SandboxNotFound(sandbox_id) from None
            if now.entry.state is not State.IN_USE:
                raise Conflict(
                    f"sandbox {sandbox_id} is {now.entry.state.value.replace('_', ' ')}; "
                    "connect again once that is done"
                ) from None
        except SandboxDied:
            # Found dead by this resume, which recorded why: answer as a GET now would.
            self.keeper.notices.ended(sandbox_id)
            died = self._tombstone(sandbox_id)
            raise SandboxNotFound(sandbox_id, None if died is None else _notice(died)) from None
        self.keeper.notices.changed(sandbox_id)
        seconds = timeout_s if timeout_s is not None else int(handed.sandbox.timeout_s)
        self.store.set_sandbox_deadline(sandbox_id, time.time() + seconds, seconds)
        woken = self.store.get_sandbox(sandbox_id)
        if woken is None:
            raise SandboxNotFound(sandbox_id)
        return woken

    def auto_resume(self, sandbox_id: str) -> bool:
        """Traffic reached a paused sandbox: resume it if it asked for that at creation."""
        handed = self.store.get_sandbox(sandbox_id)
        if handed is not None and handed.entry.state in (State.PAUSED_FILES, State.RESUMING):
            return False  # as E2B: traffic never boots a files-only pause; connect() does
        if handed is None or handed.entry.state is not State.PAUSED:
            return handed is not None
        if not handed.sandbox.auto_resume:
            return False
        try:
            self._wake(handed, None)
        except (SandboxNotFound, Conflict):
            return False
        return True


def _notice(died: TombstoneRecord) -> DeathNotice:
    return DeathNotice(died.died_at, died.reason, died.detail, died.log_tail)
