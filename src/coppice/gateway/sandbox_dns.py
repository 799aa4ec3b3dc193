"""The gateway's side of the sandboxes' network: a resolver on each bridge this host has, the
host's door opened for it and the gateway's own port, and the rules of running sandboxes
restored from the store at start."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from coppice.config import Settings
from coppice.egress_policy import EgressPolicy
from coppice.net.host_guard import HostGuard
from coppice.net.resolver import DNS_PORT, SandboxResolver, upstreams_from
from coppice.pool.controller import PoolController

log = logging.getLogger("coppice.gateway.dns")


class SandboxNetworkService:
    def __init__(self, settings: Settings, controller: PoolController, port: int) -> None:
        self.settings = settings
        self.controller = controller
        self.ports = (DNS_PORT, port)
        self._running: list[tuple[SandboxResolver, HostGuard]] = []

    def start(self) -> None:
        self.controller.restore_egress()
        upstreams = upstreams_from(self.settings.dns_upstreams)
        if not upstreams:
            log.warning(
                "no DNS servers to forward to: set dns_upstreams or give the host an "
                "/etc/resolv.conf; sandboxes will get SERVFAIL for every name"
            )
        for name, sub in self.controller.substrates.items():
            bridge = sub.network.bridge
            if not Path("/sys/class/net", bridge).exists():
                continue  # a substrate this host does not run (or the in-memory fake)
            guard = HostGuard(bridge)
            guard.open(self.ports)
            resolver = SandboxResolver(
                str(sub.network.gateway),
                upstreams,
                policy_of=self._policy_lookup(name),
                pin=sub.egress.pin,
            )
            resolver.start()
            self._running.append((resolver, guard))
            log.info("resolver for %s sandboxes on %s:%d", name, sub.network.gateway, DNS_PORT)

    def stop(self) -> None:
        for resolver, guard in self._running:
            resolver.stop()
            guard.close(self.ports)
        self._running.clear()

    def _policy_lookup(self, substrate: str) -> Callable[[str], EgressPolicy]:
        default = EgressPolicy(allow_internet=self.settings.internet_access)
        store = self.controller.store

        def policy_of(ip: str) -> EgressPolicy:
            handed = store.sandbox_at(substrate, ip)
            if handed is None or handed.sandbox.egress is None:
                return default  # a pool entry, or a sandbox without rules of its own
            return handed.sandbox.egress

        return policy_of
