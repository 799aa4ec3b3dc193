"""The gateway's parts, assembled once per process, and the two pools of worker threads the
ASGI side runs blocking work in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from coppice.config import Settings
from coppice.errors import SandboxUnreachable
from coppice.gateway.auth import KeyRing
from coppice.gateway.keeper import PoolKeeper
from coppice.gateway.proxy import SandboxDirectory, SandboxProxy
from coppice.gateway.sandbox_metrics import SandboxMetrics
from coppice.gateway.sandboxes import SandboxService
from coppice.gateway.service_metrics import ServiceMetrics
from coppice.gateway.snapshots import SnapshotService
from coppice.gateway.templates import TemplateService
from coppice.pool.controller import PoolController
from coppice.store.records import HandedOut
from coppice.substrates.base import AGENT_PORT

T = TypeVar("T")

#: quick store work (get, list, kill's commit, connect): never queued behind starts
QUICK_THREADS = 40
#: slow lifecycle work (creates, which may start a sandbox cold and take seconds), beyond
#: one thread for every create the admission queue may hold: a create waiting in line
#: sleeps in its thread, and must not keep a create that the pool can serve from one
SLOW_THREADS = 16


@dataclass
class Gateway:
    settings: Settings
    controller: PoolController
    keys: KeyRing
    keeper: PoolKeeper
    service: SandboxService
    proxy: SandboxProxy
    directory: SandboxDirectory
    templates: TemplateService
    metrics: SandboxMetrics
    #: the service's own (Prometheus), where `metrics` are E2B's per-sandbox readings
    service_metrics: ServiceMetrics
    snapshots: SnapshotService
    _quick: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(QUICK_THREADS)
    )
    _slow: anyio.CapacityLimiter = field(init=False)

    def __post_init__(self) -> None:
        self._slow = anyio.CapacityLimiter(SLOW_THREADS + self.settings.admission_queue_max)

    def template_of(self, handed: HandedOut) -> str:
        return handed.entry.template

    async def quick(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._quick)

    async def slow(self, fn: Callable[..., T], *args: Any) -> T:
        """Work that can take seconds; it has threads of its own, so a burst of cold
        starts cannot starve the reads every other request makes."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._slow)

    def dial(self, handed: HandedOut, port: int = AGENT_PORT) -> tuple[str, int]:
        """Where a sandbox port is reached: its driver says where its agent listens (the
        E2B protocol names envd's port 49983 whatever the driver does); other ports are on
        the same host."""
        handle = handed.entry.handle
        if handle is None:
            raise SandboxUnreachable(handed.sandbox.id, port)
        sub = self.controller.substrate(handed.entry.substrate)
        host, agent_port = sub.agent_address(handle)
        return host, agent_port if port == AGENT_PORT else port

    async def init_agent(self, handed: HandedOut) -> None:
        """Give the agent its identity: sandbox-wide env vars and access token (after a
        create, a fork, or a restart of its processes, whose fresh agent knows neither). The
        default user is the template's (its last USER), which the agent already knows."""
        body = {
            "envVars": handed.sandbox.env_vars,
            "accessToken": handed.sandbox.access_token,
        }
        host, port = self.dial(handed)
        url = f"http://{host}:{port}/init"
        try:
            answer = await self.proxy.client(handed.sandbox.id).post(url, json=body, timeout=10.0)
        except Exception as exc:
            raise SandboxUnreachable(handed.sandbox.id, AGENT_PORT) from exc
        if answer.status_code >= 300:
            raise SandboxUnreachable(handed.sandbox.id, AGENT_PORT)

    def entry_alive(self, handed: HandedOut) -> bool:
        sub = self.controller.substrate(handed.entry.substrate)
        return sub.is_alive(handed.entry.id, handed.entry.handle)
