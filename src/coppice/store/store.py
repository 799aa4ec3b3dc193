"""The SQLite store: one writer transaction per decision, safe across threads and processes.

Each thread gets its own connection (sqlite3 connections are not shareable across threads).
Every decision that reads and then writes (reserving addresses, checking an entry out,
applying a lifecycle event) runs inside `BEGIN IMMEDIATE`, so two processes deciding at once
are serialised by SQLite itself and can never both take the same entry or address.
"""

from __future__ import annotations

import errno
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from coppice.config import Limits
from coppice.egress_policy import EgressPolicy
from coppice.errors import (
    CapacityExceeded,
    Conflict,
    EntryNotFound,
    HostResourceExhausted,
    PoolExhausted,
    SnapshotNotFound,
    TemplateNotFound,
)
from coppice.host.processes import ProcessIdentity
from coppice.lifecycle import HANDED_OUT_STATES, Action, Event, State, deadline_for, transition
from coppice.store import disk_budget, ipam
from coppice.store.disk_budget import DiskHolder
from coppice.store.records import (
    ENTRY_COLUMNS,
    SANDBOX_COLUMNS,
    BuildFailure,
    BuildLogEntry,
    EntryRecord,
    HandedOut,
    Handle,
    PoolTargetRecord,
    SandboxRecord,
    SnapshotArtifact,
    SnapshotRecord,
    TemplateBuildRecord,
    TemplateRecord,
    TemplateTagRecord,
    TombstoneRecord,
)
from coppice.store.schema import migrate

HANDED_OUT = HANDED_OUT_STATES


@dataclass(frozen=True)
class Applied:
    """The outcome of one lifecycle event: the entry as it now is, and what to do about it."""

    entry: EntryRecord
    actions: tuple[Action, ...]


@dataclass(frozen=True)
class Buried:
    """A death recorded: the entry's DIED applied and, if it was handed out, its tombstone."""

    applied: Applied
    tombstone: TombstoneRecord | None


@dataclass(frozen=True)
class CaptureStarted:
    """A capture decided: the source is SNAPSHOTTING and its snapshot row is "making"."""

    applied: Applied
    snapshot: SnapshotRecord


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(6)


def new_entry_id() -> str:
    # 10 hex digits: short enough for a 15-byte interface name with a 4-letter prefix.
    return secrets.token_hex(5)


class Store:
    def __init__(self, path: Path, owner: ProcessIdentity | None = None) -> None:
        self.path = path
        self.owner = owner or ProcessIdentity.current()
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        migrate(self._conn())

    # -- plumbing ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            conn.row_factory = sqlite3.Row
            _enable_wal(conn)
            # NORMAL is durable across process crashes in WAL mode; only a power cut may lose
            # the last transactions, and reconcile repairs exactly that kind of gap.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _translate(exc) from exc
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise _translate(exc) from exc
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _event(
        self,
        conn: sqlite3.Connection,
        kind: str,
        entry_id: str | None,
        template: str | None,
        detail: str = "",
    ) -> None:
        conn.execute(
            "INSERT INTO events (ts, entry_id, template, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (time.time(), entry_id, template, kind, detail),
        )

    # -- templates --------------------------------------------------------------------------

    def put_template(self, record: TemplateRecord) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO templates (name, substrate, recipe_hash, rootfs,"
                " built_at, build_seconds, size_bytes, policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                record.row(),
            )
            self._event(conn, "template_built", None, record.name, record.recipe_hash)

    def get_template(self, name: str) -> TemplateRecord:
        row = self._conn().execute("SELECT * FROM templates WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise TemplateNotFound(name)
        return TemplateRecord.from_row(row)

    def list_templates(self) -> list[TemplateRecord]:
        rows = self._conn().execute("SELECT * FROM templates ORDER BY name").fetchall()
        return [TemplateRecord.from_row(r) for r in rows]

    def delete_template(self, name: str) -> None:
        """The template goes with its build history and tags (and their logs, by cascade)."""
        with self._write() as conn:
            conn.execute("DELETE FROM templates WHERE name = ?", (name,))
            conn.execute("DELETE FROM template_tags WHERE template = ?", (name,))
            conn.execute("DELETE FROM template_builds WHERE template = ?", (name,))
            self._event(conn, "template_removed", None, name)

    # -- template builds --------------------------------------------------------------------

    def add_build(self, template: str, limits: Limits, tags: Sequence[str]) -> TemplateBuildRecord:
        """A build asked for, waiting for its steps."""
        build_id = str(uuid.uuid4())
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO template_builds (id, template, status, limits, tags, created_at,"
                " updated_at) VALUES (?, ?, 'waiting', ?, ?, ?, ?)",
                (build_id, template, json.dumps(asdict(limits)),
                 json.dumps(list(tags)), now, now),
            )  # fmt: skip
            self._event(conn, "build_requested", None, template, build_id)
        found = self.get_build(build_id)
        assert found is not None
        return found

    def record_build(self, build: TemplateBuildRecord) -> None:
        """Keep a build made some other way (a CLI build, as the gateway names it), so that
        tags can name it; a build already kept stays as it is."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO template_builds (id, template, status, limits, tags,"
                " created_at, updated_at, started_at, finished_at, recipe_hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (build.id, build.template, build.status, json.dumps(asdict(build.limits)),
                 json.dumps(list(build.tags)), build.created_at, build.updated_at,
                 build.started_at, build.finished_at, build.recipe_hash),
            )  # fmt: skip

    def get_build(self, build_id: str) -> TemplateBuildRecord | None:
        row = (
            self._conn()
            .execute("SELECT * FROM template_builds WHERE id = ?", (build_id,))
            .fetchone()
        )
        return None if row is None else TemplateBuildRecord.from_row(row)

    def list_builds(self, template: str | None = None) -> list[TemplateBuildRecord]:
        """Newest first."""
        where, args = ("WHERE template = ?", (template,)) if template is not None else ("", ())
        rows = self._conn().execute(
            f"SELECT * FROM template_builds {where} ORDER BY created_at DESC, id",  # noqa: S608
            args,
        )
        return [TemplateBuildRecord.from_row(r) for r in rows.fetchall()]

    def trigger_build(self, build_id: str) -> TemplateBuildRecord:
        """The build's steps arrived: it is queued (still waiting) and cannot start twice."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE template_builds SET started_at = ?, updated_at = ?, owner_pid = ?,"
                " owner_start = ? WHERE id = ? AND status = 'waiting' AND started_at IS NULL",
                (time.time(), time.time(), self.owner.pid, self.owner.start_time, build_id),
            )
            if cur.rowcount == 0:
                raise Conflict(
                    f"build {build_id} was already started; request a new build to build again"
                )
        found = self.get_build(build_id)
        assert found is not None
        return found

    def begin_build(self, build_id: str) -> bool:
        """A worker took the build up; False if it is no longer waiting (given up on)."""
        return self._move_build(build_id, "waiting", "building")

    def finish_build(self, build_id: str, recipe_hash: str) -> bool:
        """The build made `recipe_hash`, now serving: it is ready and takes its tags."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT * FROM template_builds WHERE id = ? AND status = 'building'", (build_id,)
            ).fetchone()
            if row is None:
                return False
            build = TemplateBuildRecord.from_row(row)
            conn.execute(
                "UPDATE template_builds SET status = 'ready', recipe_hash = ?, updated_at = ?,"
                " finished_at = ? WHERE id = ?",
                (recipe_hash, now, now, build_id),
            )
            for tag in build.tags:
                conn.execute(
                    "INSERT OR REPLACE INTO template_tags (template, tag, build_id, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (build.template, tag, build_id, now),
                )
            self._event(conn, "build_ready", None, build.template, build_id)
        return True

    def fail_build(self, build_id: str, failure: BuildFailure) -> bool:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE template_builds SET status = 'error', failure = ?, updated_at = ?,"
                " finished_at = ? WHERE id = ? AND status IN ('waiting', 'building')",
                (json.dumps(failure.to_json()), now, now, build_id),
            )
            if cur.rowcount:
                self._event(conn, "build_failed", None, None, f"{build_id}: {failure.message}")
        return cur.rowcount > 0

    def interrupt_builds(self, message: str) -> list[str]:
        """Builds started and not finished whose process is gone (it ran them) end in error;
        returns them. Builds still waiting for their steps are left: the caller may yet
        start them."""
        failure = json.dumps(BuildFailure(message).to_json())
        now = time.time()
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id, owner_pid, owner_start FROM template_builds WHERE status = 'building'"
                " OR (status = 'waiting' AND started_at IS NOT NULL)"
            ).fetchall()
            ids = [
                r[0] for r in rows if r[1] is None or not ProcessIdentity(r[1], r[2]).is_running()
            ]
            for build_id in ids:
                conn.execute(
                    "UPDATE template_builds SET status = 'error', failure = ?, updated_at = ?,"
                    " finished_at = ? WHERE id = ?",
                    (failure, now, now, build_id),
                )
        return ids

    def _move_build(self, build_id: str, before: str, after: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE template_builds SET status = ?, updated_at = ? WHERE id = ? AND status = ?",
                (after, time.time(), build_id, before),
            )
        return cur.rowcount > 0

    def add_build_logs(self, build_id: str, entries: Sequence[BuildLogEntry]) -> None:
        with self._write() as conn:
            start = conn.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM build_logs WHERE build_id = ?",
                (build_id,),
            ).fetchone()[0]
            conn.executemany(
                "INSERT INTO build_logs (build_id, seq, ts, level, message, step)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (build_id, start + i, e.timestamp, e.level, e.message, e.step)
                    for i, e in enumerate(entries)
                ],
            )

    def build_logs(
        self,
        build_id: str,
        *,
        levels: Sequence[str] | None = None,
        offset: int = 0,
        limit: int = 100,
        since: float | None = None,
        until: float | None = None,
        newest_first: bool = False,
    ) -> list[BuildLogEntry]:
        """A build's log lines in order (or newest first), optionally of some levels only
        and from or up to a time; `offset` counts the lines that match."""
        where: list[str] = ["build_id = ?"]
        args: list[object] = [build_id]
        if levels is not None:
            where.append(f"level IN ({', '.join('?' for _ in levels)})")
            args += list(levels)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts <= ?")
            args.append(until)
        order = "DESC" if newest_first else "ASC"
        rows = self._conn().execute(
            f"SELECT ts, level, message, step FROM build_logs WHERE {' AND '.join(where)}"  # noqa: S608
            f" ORDER BY seq {order} LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [BuildLogEntry(r[0], r[1], r[2], r[3]) for r in rows.fetchall()]

    # -- template tags ----------------------------------------------------------------------

    def tag_build(self, template: str, build_id: str, tags: Sequence[str]) -> None:
        now = time.time()
        with self._write() as conn:
            for tag in tags:
                conn.execute(
                    "INSERT OR REPLACE INTO template_tags (template, tag, build_id, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (template, tag, build_id, now),
                )

    def untag(self, template: str, tags: Sequence[str]) -> list[str]:
        """Removes the tags that exist, all or none: returns those that do not (and then
        removes nothing)."""
        with self._write() as conn:
            known = {
                r[0]
                for r in conn.execute(
                    "SELECT tag FROM template_tags WHERE template = ?", (template,)
                )
            }
            missing = [t for t in tags if t not in known]
            if missing:
                return missing
            conn.executemany(
                "DELETE FROM template_tags WHERE template = ? AND tag = ?",
                [(template, t) for t in tags],
            )
        return []

    def list_tags(self, template: str) -> list[TemplateTagRecord]:
        rows = self._conn().execute(
            "SELECT template, tag, build_id, created_at FROM template_tags WHERE template = ?"
            " ORDER BY created_at DESC, tag",
            (template,),
        )
        return [TemplateTagRecord(*r) for r in rows.fetchall()]

    def get_tag(self, template: str, tag: str) -> TemplateTagRecord | None:
        row = (
            self._conn()
            .execute(
                "SELECT template, tag, build_id, created_at FROM template_tags"
                " WHERE template = ? AND tag = ?",
                (template, tag),
            )
            .fetchone()
        )
        return None if row is None else TemplateTagRecord(*row)

    # -- entries ----------------------------------------------------------------------------

    def reserve(
        self,
        template: str,
        substrate: str,
        count: int,
        addresses: Sequence[Any],
        hostname_prefix: str,
    ) -> list[EntryRecord]:
        """Create `count` entries in WARMING, each with its own free address, atomically."""
        now = time.time()
        with self._write() as conn:
            held = [
                r[0]
                for r in conn.execute("SELECT ip FROM entries WHERE substrate = ?", (substrate,))
            ]
            picked = ipam.pick_free(addresses, held, count)
            if len(picked) < count:
                raise CapacityExceeded(
                    f"only {len(picked)} free addresses left for {substrate} entries "
                    f"({len(held)} of {len(addresses)} in use); drain a pool or ask for fewer"
                )
            ids = []
            for addr in picked:
                entry_id = new_entry_id()
                conn.execute(
                    "INSERT INTO entries (id, template, substrate, state, ip, hostname,"
                    " owner_pid, owner_start, deadline, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry_id,
                        template,
                        substrate,
                        State.WARMING.value,
                        str(addr),
                        f"{hostname_prefix}-{entry_id}",
                        self.owner.pid,
                        self.owner.start_time,
                        deadline_for(State.WARMING, now),
                        now,
                        now,
                    ),
                )
                self._event(conn, "reserved", entry_id, template, str(addr))
                ids.append(entry_id)
        return [self.get(i) for i in ids]

    def set_handle(self, entry_id: str, handle: Handle) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE entries SET handle = ?, updated_at = ? WHERE id = ?",
                (json.dumps(handle.to_json()), time.time(), entry_id),
            )
            if cur.rowcount == 0:
                raise EntryNotFound(entry_id)

    def get(self, entry_id: str) -> EntryRecord:
        row = self._conn().execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            raise EntryNotFound(entry_id)
        return EntryRecord.from_row(row)

    def list_entries(self, template: str | None = None) -> list[EntryRecord]:
        if template is None:
            rows = self._conn().execute("SELECT * FROM entries ORDER BY created_at, id")
        else:
            rows = self._conn().execute(
                "SELECT * FROM entries WHERE template = ? ORDER BY created_at, id", (template,)
            )
        return [EntryRecord.from_row(r) for r in rows.fetchall()]

    def apply(self, entry_id: str, event: Event, detail: str = "") -> Applied:
        with self._write() as conn:
            return self._apply(conn, entry_id, event, detail)

    def _apply(self, conn: sqlite3.Connection, entry_id: str, event: Event, detail: str) -> Applied:
        row = conn.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            raise EntryNotFound(entry_id)
        entry = EntryRecord.from_row(row)
        step = transition(entry_id, entry.state, event)
        now = time.time()
        self._event(conn, event.value, entry_id, entry.template, detail)
        if entry.state in HANDED_OUT and step.state not in HANDED_OUT:
            # Killed, returned or found dead: the sandbox is over the moment its entry leaves.
            conn.execute("DELETE FROM sandboxes WHERE id = ?", (entry_id,))
        if Action.FORGET in step.actions:
            conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            return Applied(replace(entry, state=step.state), step.actions)
        conn.execute(
            "UPDATE entries SET state = ?, deadline = ?, owner_pid = ?, owner_start = ?,"
            " updated_at = ?,"
            " ready_at = CASE WHEN ? THEN ? ELSE ready_at END,"
            " checked_out_at = CASE WHEN ? THEN ? ELSE checked_out_at END"
            " WHERE id = ?",
            (
                step.state.value,
                deadline_for(step.state, now),
                self.owner.pid,
                self.owner.start_time,
                now,
                step.state is State.AVAILABLE,
                now,
                event in (Event.CHECKOUT, Event.HAND_OUT),
                now,
                entry_id,
            ),
        )
        row = conn.execute("SELECT * FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return Applied(EntryRecord.from_row(row), step.actions)

    def checkout(self, template: str, sandbox: SandboxRecord | None = None) -> Applied:
        """Take the longest-waiting available entry of `template` and mark it in use.

        With `sandbox`, its record is written in the same transaction (its id replaced by the
        entry's), so there is never an in-use entry without its sandbox or the reverse.
        """
        with self._write() as conn:
            row = conn.execute(
                "SELECT id FROM entries WHERE template = ? AND state = ?"
                " ORDER BY ready_at, id LIMIT 1",
                (template, State.AVAILABLE.value),
            ).fetchone()
            if row is None:
                raise PoolExhausted(template)
            applied = self._apply(conn, row[0], Event.CHECKOUT, "")
            if sandbox is not None:
                self._insert_sandbox(conn, replace(sandbox, id=applied.entry.id))
            return applied

    def hand_out(self, entry_id: str, sandbox: SandboxRecord) -> Applied:
        """Hand a cold-started entry, still warming, straight to its sandbox."""
        with self._write() as conn:
            applied = self._apply(conn, entry_id, Event.HAND_OUT, "cold start")
            self._insert_sandbox(conn, replace(sandbox, id=entry_id))
            return applied

    def _insert_sandbox(self, conn: sqlite3.Connection, sandbox: SandboxRecord) -> None:
        marks = ", ".join("?" for _ in SANDBOX_COLUMNS)
        conn.execute(
            f"INSERT INTO sandboxes ({', '.join(SANDBOX_COLUMNS)}) VALUES ({marks})",  # noqa: S608
            sandbox.row(),
        )

    # -- sandboxes ----------------------------------------------------------------------------

    def get_sandbox(self, sandbox_id: str) -> HandedOut | None:
        rows = self._handed_out("WHERE s.id = ?", (sandbox_id,))
        return rows[0] if rows else None

    def sandbox_at(self, substrate: str, ip: str) -> HandedOut | None:
        """The sandbox holding `ip` on `substrate`'s network, if one is handed out."""
        rows = self._handed_out("WHERE e.substrate = ? AND e.ip = ?", (substrate, ip))
        return rows[0] if rows else None

    def find_idempotent(self, tenant: str, key: str) -> HandedOut | None:
        rows = self._handed_out("WHERE s.tenant = ? AND s.idempotency_key = ?", (tenant, key))
        return rows[0] if rows else None

    def list_sandboxes(self, tenant: str | None = None) -> list[HandedOut]:
        if tenant is None:
            return self._handed_out("", ())
        return self._handed_out("WHERE s.tenant = ?", (tenant,))

    def expired_sandboxes(self, now: float) -> list[HandedOut]:
        return self._handed_out("WHERE s.end_at <= ? AND e.state = ?", (now, State.IN_USE.value))

    def _handed_out(self, where: str, args: tuple[Any, ...]) -> list[HandedOut]:
        cols = ", ".join(f"s.{c} AS s_{c}" for c in SANDBOX_COLUMNS)
        rows = self._conn().execute(
            f"SELECT e.*, {cols} FROM sandboxes s JOIN entries e ON e.id = s.id {where}"  # noqa: S608
            " ORDER BY s.started_at, s.id",
            args,
        )
        out = []
        for row in rows.fetchall():
            sandbox = SandboxRecord.from_mapping({c: row[f"s_{c}"] for c in SANDBOX_COLUMNS})
            entry = EntryRecord.from_mapping({k: row[k] for k in ENTRY_COLUMNS})
            out.append(HandedOut(sandbox, entry))
        return out

    def set_sandbox_deadline(self, sandbox_id: str, end_at: float, timeout_s: float) -> None:
        self._update_sandbox(
            "UPDATE sandboxes SET end_at = ?, timeout_s = ? WHERE id = ?",
            (end_at, timeout_s, sandbox_id),
        )

    def set_sandbox_egress(self, sandbox_id: str, egress: EgressPolicy | None) -> None:
        self._update_sandbox(
            "UPDATE sandboxes SET egress = ? WHERE id = ?",
            (egress.to_json() if egress is not None else None, sandbox_id),
        )

    def _update_sandbox(self, statement: str, values: tuple[object, ...]) -> None:
        """One UPDATE of one sandbox row, whose id is the statement's last parameter."""
        with self._write() as conn:
            if conn.execute(statement, values).rowcount == 0:
                raise EntryNotFound(str(values[-1]))

    def apply_if_unchanged(
        self, seen: EntryRecord, event: Event, detail: str = ""
    ) -> Applied | None:
        """Apply `event` only if nobody touched the entry since `seen` was read."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT updated_at, state FROM entries WHERE id = ?", (seen.id,)
            ).fetchone()
            if row is None or row[0] != seen.updated_at or row[1] != seen.state.value:
                return None
            return self._apply(conn, seen.id, event, detail)

    # -- deaths -------------------------------------------------------------------------------

    def bury(
        self,
        seen: EntryRecord,
        reason: str,
        detail: str,
        log_tail: Sequence[str] = (),
        died_at: float | None = None,
    ) -> Buried | None:
        """The entry was found dead: apply DIED and, if a sandbox was handed out on it, keep
        its tombstone, in one transaction (so no reader sees the sandbox neither running nor
        dead). None if someone else changed the entry since `seen` was read."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT updated_at, state FROM entries WHERE id = ?", (seen.id,)
            ).fetchone()
            if row is None or row[0] != seen.updated_at or row[1] != seen.state.value:
                return None
            owner = conn.execute(
                "SELECT tenant, access_token FROM sandboxes WHERE id = ?", (seen.id,)
            ).fetchone()
            applied = self._apply(conn, seen.id, Event.DIED, f"{reason}: {detail}")
            if owner is None:
                return Buried(applied, None)
            tombstone = TombstoneRecord(
                id=seen.id,
                tenant=owner[0],
                template=seen.template,
                access_token=owner[1],
                died_at=time.time() if died_at is None else died_at,
                reason=reason,
                detail=detail,
                log_tail=tuple(log_tail),
            )
            conn.execute(
                "INSERT OR REPLACE INTO tombstones (id, tenant, template, access_token,"
                " died_at, reason, detail, log_tail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                tombstone.row(),
            )
            return Buried(applied, tombstone)

    def get_tombstone(self, sandbox_id: str, since: float = 0.0) -> TombstoneRecord | None:
        """The sandbox's tombstone if it died at `since` or later."""
        row = (
            self._conn()
            .execute("SELECT * FROM tombstones WHERE id = ? AND died_at >= ?", (sandbox_id, since))
            .fetchone()
        )
        return None if row is None else TombstoneRecord.from_row(row)

    def prune_tombstones(self, before: float) -> int:
        """Forget the sandboxes that died before `before`; returns how many."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM tombstones WHERE died_at < ?", (before,))
        return cur.rowcount

    # -- snapshots and the disk they hold --------------------------------------------------------

    def _disk_holders(self, conn: sqlite3.Connection) -> list[DiskHolder]:
        snapshots = conn.execute("SELECT id, size_bytes FROM snapshots").fetchall()
        paused = conn.execute(
            "SELECT s.id, s.kept_bytes FROM sandboxes s JOIN entries e ON e.id = s.id"
            " WHERE e.state IN (?, ?, ?) AND s.kept_bytes > 0",
            (State.PAUSED_FILES.value, State.RESUMING.value, State.PAUSED.value),
        ).fetchall()
        return [DiskHolder("snapshot", r[0], r[1]) for r in snapshots] + [
            DiskHolder("paused sandbox", r[0], r[1]) for r in paused
        ]

    def disk_holders(self) -> list[DiskHolder]:
        """What holds disk against the snapshot budget now."""
        return self._disk_holders(self._conn())

    def begin_capture(
        self,
        source_id: str,
        tenant: str,
        purpose: str,
        kind: str,
        path_of: Callable[[str], Path],
        need_bytes: int,
        budget_bytes: int,
    ) -> CaptureStarted:
        """Start capturing a running sandbox, in one transaction: it goes SNAPSHOTTING (no
        pause or kill can pull it away mid-capture), the need is checked against the disk
        budget, and the snapshot's row is written "making" before anything reaches disk."""
        snapshot_id = new_snapshot_id()
        with self._write() as conn:
            disk_budget.check(
                self._disk_holders(conn),
                need_bytes,
                budget_bytes,
                f"a {'fork' if purpose == 'fork' else 'snapshot'} of {source_id}",
            )
            applied = self._apply(conn, source_id, Event.SNAPSHOT, f"{purpose} {snapshot_id}")
            entry = applied.entry
            conn.execute(
                "INSERT INTO snapshots (id, name, tenant, source_id, template, substrate,"
                " purpose, kind, size_bytes, path, state, created_at, owner_pid, owner_start)"
                " VALUES (?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, 'making', ?, ?, ?)",
                (snapshot_id, tenant, source_id, entry.template, entry.substrate, purpose,
                 kind, need_bytes, str(path_of(snapshot_id)), time.time(), self.owner.pid,
                 self.owner.start_time),
            )  # fmt: skip
            self._event(conn, f"{purpose}_started", source_id, entry.template, snapshot_id)
            return CaptureStarted(applied, self._snapshot_in(conn, snapshot_id))

    def end_capture(
        self,
        snapshot_id: str,
        artifact: SnapshotArtifact | None,
        name: str | None = None,
    ) -> tuple[Applied | None, SnapshotRecord | None]:
        """The capture is over: the source runs again (if it is still there to), and the
        snapshot is ready under `name` (taken over from an older snapshot of the tenant's
        that had it), or, with no artifact (it failed), forgotten. A fork's capture stays
        "making" with its artifact until `delete_snapshot`, once its forks are up."""
        with self._write() as conn:
            found = self._snapshot_in(conn, snapshot_id)
            applied = None
            row = conn.execute(
                "SELECT state FROM entries WHERE id = ?", (found.source_id,)
            ).fetchone()
            if row is not None and row[0] == State.SNAPSHOTTING.value:
                applied = self._apply(conn, found.source_id, Event.SNAPSHOT_DONE, snapshot_id)
            if artifact is None:
                conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
                return applied, None
            kind = "files+memory" if artifact.kept_memory else "files"
            state = "making" if found.purpose == "fork" else "ready"
            if name is not None:
                conn.execute(
                    "UPDATE snapshots SET name = NULL WHERE tenant = ? AND name = ?",
                    (found.tenant, name),
                )
            conn.execute(
                "UPDATE snapshots SET name = ?, kind = ?, size_bytes = ?, state = ?,"
                " artifact = ? WHERE id = ?",
                (name, kind, artifact.size_bytes, state, json.dumps(artifact.to_json()),
                 snapshot_id),
            )  # fmt: skip
            self._event(conn, f"{found.purpose}_taken", found.source_id, found.template, kind)
            return applied, self._snapshot_in(conn, snapshot_id)

    def _snapshot_in(self, conn: sqlite3.Connection, snapshot_id: str) -> SnapshotRecord:
        row = conn.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        if row is None:
            raise SnapshotNotFound(snapshot_id)
        return SnapshotRecord.from_row(row)

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        row = (
            self._conn().execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        )
        return None if row is None else SnapshotRecord.from_row(row)

    def named_snapshot(self, tenant: str, name: str) -> SnapshotRecord | None:
        row = (
            self._conn()
            .execute("SELECT * FROM snapshots WHERE tenant = ? AND name = ?", (tenant, name))
            .fetchone()
        )
        return None if row is None else SnapshotRecord.from_row(row)

    def list_snapshots(self, tenant: str | None = None) -> list[SnapshotRecord]:
        """Every snapshot (of `tenant`), forks' captures and half-made ones included,
        oldest first."""
        where, args = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        rows = self._conn().execute(
            f"SELECT * FROM snapshots {where} ORDER BY created_at, id",  # noqa: S608
            args,
        )
        return [SnapshotRecord.from_row(r) for r in rows.fetchall()]

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Forget the snapshot; its files are removed (by its driver) before this."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
            if cur.rowcount:
                self._event(conn, "snapshot_deleted", None, None, snapshot_id)

    def pause_kept(
        self, entry_id: str, event: Event, kept_bytes: int, budget_bytes: int
    ) -> Applied:
        """Pause a running sandbox into what it keeps on disk (PAUSE_FILES: its files; PAUSE
        on a driver that writes memory to disk: its memory too), if that fits the disk
        budget: one transaction for the check, the pause and what it holds."""
        what = "a files-only pause" if event is Event.PAUSE_FILES else "a pause"
        with self._write() as conn:
            if kept_bytes > 0:  # a freeze keeps nothing on disk and is never refused
                disk_budget.check(
                    self._disk_holders(conn), kept_bytes, budget_bytes, f"{what} of {entry_id}"
                )
            applied = self._apply(conn, entry_id, event, f"{kept_bytes} bytes kept")
            conn.execute("UPDATE sandboxes SET kept_bytes = ? WHERE id = ?", (kept_bytes, entry_id))
            return applied

    def processes_lost(self, seen: EntryRecord, kept_bytes: int) -> Applied | None:
        """A frozen sandbox's processes are gone and its files are kept (a host reboot): it
        stays, as a files-only pause. None if someone changed the entry since `seen`."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT updated_at, state FROM entries WHERE id = ?", (seen.id,)
            ).fetchone()
            if row is None or row[0] != seen.updated_at or row[1] != seen.state.value:
                return None
            applied = self._apply(conn, seen.id, Event.PROCESSES_LOST, "processes gone, files kept")
            conn.execute("UPDATE sandboxes SET kept_bytes = ? WHERE id = ?", (kept_bytes, seen.id))
            return applied

    # -- pool targets ---------------------------------------------------------------------------

    def set_pool_target(self, record: PoolTargetRecord) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO pool_targets"
                " (template, target, why, wanted, waiting, decided_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.template,
                    record.target,
                    record.why,
                    record.wanted,
                    record.waiting,
                    record.decided_at,
                ),
            )

    def pool_targets(self) -> dict[str, PoolTargetRecord]:
        rows = self._conn().execute("SELECT * FROM pool_targets").fetchall()
        return {row["template"]: PoolTargetRecord.from_row(row) for row in rows}


def _enable_wal(conn: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Switch a database to WAL. The switch needs a moment of exclusive access and SQLite
    answers "locked" at once (ignoring the busy timeout) when several processes open a new
    database together, so retry until one of them has made the switch for all."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if time.monotonic() > deadline:
                raise _translate(exc) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _translate(exc: sqlite3.OperationalError) -> Exception:
    text = str(exc).lower()
    if "disk" in text and "full" in text:
        return HostResourceExhausted(
            f"the state database cannot grow: {exc}; free disk space under the state directory"
        )
    if "locked" in text or "busy" in text:
        return HostResourceExhausted(f"the state database stayed locked for 30 s: {exc}")
    if getattr(exc, "sqlite_errorcode", None) == errno.ENOSPC:
        return HostResourceExhausted(str(exc))
    return exc
