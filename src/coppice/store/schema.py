"""Versioned schema migrations, applied in order; `PRAGMA user_version` records the last."""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[str, ...] = (
    # 1: templates, pool entries, an event log
    """
    CREATE TABLE templates (
        name          TEXT PRIMARY KEY,
        substrate     TEXT NOT NULL,
        recipe_hash   TEXT NOT NULL,
        rootfs        TEXT NOT NULL,
        built_at      REAL NOT NULL,
        build_seconds REAL NOT NULL,
        size_bytes    INTEGER NOT NULL
    );
    CREATE TABLE entries (
        id             TEXT PRIMARY KEY,
        template       TEXT NOT NULL,
        substrate      TEXT NOT NULL,
        state          TEXT NOT NULL,
        ip             TEXT NOT NULL,
        hostname       TEXT NOT NULL,
        handle         TEXT,
        owner_pid      INTEGER,
        owner_start    INTEGER,
        deadline       REAL,
        created_at     REAL NOT NULL,
        updated_at     REAL NOT NULL,
        ready_at       REAL,
        checked_out_at REAL
    );
    -- Every row is a live claim on its address: rows are deleted when their entry is gone.
    CREATE UNIQUE INDEX entries_address ON entries (substrate, ip);
    CREATE INDEX entries_pick ON entries (template, state, ready_at);
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        ts       REAL NOT NULL,
        entry_id TEXT,
        template TEXT,
        kind     TEXT NOT NULL,
        detail   TEXT NOT NULL DEFAULT ''
    );
    """,
    # 2: sandboxes handed out through the gateway; one row per in-use (or paused) entry
    """
    CREATE TABLE sandboxes (
        id              TEXT PRIMARY KEY REFERENCES entries (id) ON DELETE CASCADE,
        template_id     TEXT NOT NULL,
        tenant          TEXT NOT NULL,
        access_token    TEXT NOT NULL,
        env_vars        TEXT NOT NULL,
        metadata        TEXT NOT NULL,
        started_at      REAL NOT NULL,
        end_at          REAL NOT NULL,
        timeout_s       REAL NOT NULL,
        on_timeout      TEXT NOT NULL,
        auto_resume     INTEGER NOT NULL,
        idempotency_key TEXT
    );
    CREATE UNIQUE INDEX sandboxes_idempotency ON sandboxes (tenant, idempotency_key);
    CREATE INDEX sandboxes_end ON sandboxes (end_at);
    """,
    # 3: a sandbox whose ports are not public holds the token their traffic must carry
    """
    ALTER TABLE sandboxes ADD COLUMN traffic_token TEXT;
    """,
    # 4: a template's runtime policy (limits, aliases, cold start), fixed at build time
    """
    ALTER TABLE templates ADD COLUMN policy TEXT;
    """,
    # 5: builds asked for through the E2B build API, their logs, and the tags naming them
    """
    CREATE TABLE template_builds (
        id          TEXT PRIMARY KEY,
        template    TEXT NOT NULL,
        status      TEXT NOT NULL,
        limits      TEXT NOT NULL,
        tags        TEXT NOT NULL,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        started_at  REAL,
        finished_at REAL,
        recipe_hash TEXT,
        failure     TEXT,
        owner_pid   INTEGER,
        owner_start INTEGER
    );
    CREATE INDEX template_builds_of ON template_builds (template, created_at);
    CREATE TABLE build_logs (
        build_id TEXT NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
        seq      INTEGER NOT NULL,
        ts       REAL NOT NULL,
        level    TEXT NOT NULL,
        message  TEXT NOT NULL,
        step     TEXT,
        PRIMARY KEY (build_id, seq)
    );
    CREATE TABLE template_tags (
        template   TEXT NOT NULL,
        tag        TEXT NOT NULL,
        build_id   TEXT NOT NULL REFERENCES template_builds (id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        PRIMARY KEY (template, tag)
    );
    """,
    # 6: sandboxes that died (out of memory, a crash, a host restart), remembered for a while
    # so that their user is told why; one row per dead sandbox, pruned by age
    """
    CREATE TABLE tombstones (
        id           TEXT PRIMARY KEY,
        tenant       TEXT NOT NULL,
        template     TEXT NOT NULL,
        access_token TEXT NOT NULL,
        died_at      REAL NOT NULL,
        reason       TEXT NOT NULL,
        detail       TEXT NOT NULL,
        log_tail     TEXT NOT NULL
    );
    CREATE INDEX tombstones_died ON tombstones (died_at);
    """,
    # 7: a sandbox's egress rules (NULL: the host's default), reapplied after a restart
    """
    ALTER TABLE sandboxes ADD COLUMN egress TEXT;
    """,
    # 8: each pool's target as the gateway's keeper last decided it, and why, so that the
    # CLI (another process) shows what the service is doing
    """
    CREATE TABLE pool_targets (
        template   TEXT PRIMARY KEY,
        target     INTEGER NOT NULL,
        why        TEXT NOT NULL,
        wanted     INTEGER NOT NULL,
        waiting    INTEGER NOT NULL,
        decided_at REAL NOT NULL
    );
    """,
    # 9: snapshots (and forks' passing captures), made in state 'making' before anything is
    # written to disk so that reconcile can remove what a crash leaves; the disk a files-only
    # paused sandbox keeps, for the disk budget
    """
    CREATE TABLE snapshots (
        id          TEXT PRIMARY KEY,
        name        TEXT,
        tenant      TEXT NOT NULL,
        source_id   TEXT NOT NULL,
        template    TEXT NOT NULL,
        substrate   TEXT NOT NULL,
        purpose     TEXT NOT NULL,
        kind        TEXT NOT NULL,
        size_bytes  INTEGER NOT NULL,
        path        TEXT NOT NULL,
        state       TEXT NOT NULL,
        created_at  REAL NOT NULL,
        owner_pid   INTEGER,
        owner_start INTEGER,
        artifact    TEXT
    );
    CREATE UNIQUE INDEX snapshots_name ON snapshots (tenant, name);
    CREATE INDEX snapshots_listed ON snapshots (tenant, created_at);
    ALTER TABLE sandboxes ADD COLUMN kept_bytes INTEGER NOT NULL DEFAULT 0;
    """,
)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to the newest schema; returns the version it is at."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(MIGRATIONS)
