"""Plain records the store hands out; they carry data, not behaviour."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from coppice.pool.lifecycle import State


@dataclass(frozen=True)
class TemplateRecord:
    name: str
    substrate: str
    recipe_hash: str
    rootfs: str
    built_at: float
    build_seconds: float
    size_bytes: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TemplateRecord:
        return cls(**{k: row[k] for k in row.keys()})  # noqa: SIM118 - Row has no iterator of keys


@dataclass(frozen=True)
class EntryRecord:
    id: str
    template: str
    substrate: str
    state: State
    ip: str
    hostname: str
    handle: dict[str, Any] | None
    owner_pid: int | None
    owner_start: int | None
    deadline: float | None
    created_at: float
    updated_at: float
    ready_at: float | None
    checked_out_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EntryRecord:
        data = {k: row[k] for k in row.keys()}  # noqa: SIM118
        data["state"] = State(data["state"])
        data["handle"] = json.loads(data["handle"]) if data["handle"] else None
        return cls(**data)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "template": self.template,
            "substrate": self.substrate,
            "state": self.state.value,
            "ip": self.ip,
            "hostname": self.hostname,
            "pid": (self.handle or {}).get("pid"),
            "created_at": self.created_at,
            "ready_at": self.ready_at,
            "checked_out_at": self.checked_out_at,
        }
