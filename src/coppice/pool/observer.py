"""Who hears what the pool does, as it happens: the gateway counts it (Prometheus), the CLI
hears nothing. One narrow interface, so the pool layer knows no metrics library and each
event is told from the one place it happens."""

from __future__ import annotations

from typing import Protocol


class PoolObserver(Protocol):
    def checked_out(self, template: str, seconds: float) -> None:
        """A warm entry was handed out (a warm hit), `seconds` from asking to resumed."""

    def cold_started(self, template: str) -> None:
        """A sandbox was started on demand and handed out: the pool had none available."""

    def warm_failed(self, template: str) -> None:
        """An entry never became ready (its warm, or a cold start, failed)."""

    def sandbox_died(self, sandbox_id: str, template: str, reason: str, oom_kills: int) -> None:
        """A handed-out sandbox died; `oom_kills`: the OOM kills its cgroup counted in all."""

    def oom_kills_seen(self, sandbox_id: str, template: str, total: int) -> None:
        """A running sandbox's cgroup has counted `total` OOM kills so far."""


class NoObserver:
    """The observer of a pool nobody watches (the CLI's)."""

    def checked_out(self, template: str, seconds: float) -> None:
        pass

    def cold_started(self, template: str) -> None:
        pass

    def warm_failed(self, template: str) -> None:
        pass

    def sandbox_died(self, sandbox_id: str, template: str, reason: str, oom_kills: int) -> None:
        pass

    def oom_kills_seen(self, sandbox_id: str, template: str, total: int) -> None:
        pass
