"""A PoolController over the in-memory fake substrate and a throw-away SQLite file: the
control plane as it runs in production, minus the processes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from coppice.config import Settings
from coppice.gateway.auth import Principal, Scope
from coppice.pool.controller import PoolController
from coppice.store.records import SandboxRecord, TemplatePolicy, TemplateRecord
from coppice.store.store import Store
from coppice.substrates.fake import FakeSubstrate

TEMPLATE = "fakepy"


@dataclass
class FakePool:
    settings: Settings
    fake: FakeSubstrate
    controller: PoolController

    @property
    def store(self) -> Store:
        return self.controller.store


def fake_pool(tmp_path: Path, policy: TemplatePolicy | None = None, **settings: str) -> FakePool:
    env = {
        "COPPICE_CONFIG": str(tmp_path / "absent.toml"),
        "COPPICE_STATE_DIR": str(tmp_path / "state"),
        "COPPICE_RUN_DIR": str(tmp_path / "run"),
        **settings,
    }
    s = Settings.load(env)
    fake = FakeSubstrate(s)
    store = Store(tmp_path / "coppice.db")
    store.put_template(
        TemplateRecord(
            name=TEMPLATE,
            substrate="fake",
            recipe_hash="ab" * 32,
            rootfs=str(tmp_path / "rootfs"),
            built_at=time.time(),
            build_seconds=1.0,
            size_bytes=0,
            policy=policy or TemplatePolicy(aliases=("fake-alias",)),
        )
    )
    return FakePool(s, fake, PoolController(s, store, substrates={"fake": fake}))


def sandbox_record(timeout_s: float = 300.0, **changes: object) -> SandboxRecord:
    now = time.time()
    fields: dict[str, object] = {
        "id": "",
        "template_id": TEMPLATE,
        "tenant": "t",
        "access_token": "tok",
        "env_vars": {},
        "metadata": {},
        "started_at": now,
        "end_at": now + timeout_s,
        "timeout_s": timeout_s,
        "on_timeout": "kill",
        "auto_resume": False,
        "idempotency_key": None,
        **changes,
    }
    return SandboxRecord(**fields)  # type: ignore[arg-type]


def tenant(name: str = "t") -> Principal:
    return Principal(tenant=name, scopes=frozenset(Scope))
