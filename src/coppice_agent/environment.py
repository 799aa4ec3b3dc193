"""What the gateway tells a sandbox when it hands it out: the sandbox-wide environment
variables, the access token and the default user. Set once by `POST /init` after checkout;
before that (while the entry sits warm and paused) the defaults apply: the template's user,
workdir and env vars (`template_config`)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from coppice_agent.users import SandboxUser

InitListener = Callable[["SandboxEnvironment"], Awaitable[None]]


@dataclass
class SandboxEnvironment:
    default_user: str = "user"
    default_workdir: str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    #: the template's own ENVs: under `env_vars`, which /init replaces and these outlive
    template_envs: dict[str, str] = field(default_factory=dict)
    access_token: str | None = None
    #: How a user name becomes an account (raises UnknownUser): the accounts database. Tests
    #: swap in one that gives root a scratch home, so that nothing they run as root lands in
    #: the real /root.
    lookup_user: Callable[[str], SandboxUser] = field(default=SandboxUser.lookup, repr=False)
    _listeners: list[InitListener] = field(default_factory=list, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def on_init(self, listener: InitListener) -> None:
        """`listener` runs after every successful init, e.g. to push env vars into kernels."""
        self._listeners.append(listener)

    def user(self, name: str | None = None) -> SandboxUser:
        """The account `name` names, or the default user's. Raises UnknownUser."""
        return self.lookup_user(name or self.default_user)

    def process_env(
        self, user: SandboxUser, requested: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The environment a process of `user` starts with: the user's login environment,
        the template's env vars, the sandbox's, then the request's own, each over the last."""
        return {**user.base_env(), **self.template_envs, **self.env_vars, **(requested or {})}

    def forget_sandbox(self) -> None:
        """This VM now runs as another sandbox (a fork, or one started from a snapshot, goes
        on in its source's memory): the source's access token must neither gate the new
        sandbox's /init nor let the source's callers in. /init sets the new one's."""
        self.access_token = None

    def token_ok(self, presented: str | None) -> bool:
        if self.access_token is None:
            return True
        return presented is not None and hmac.compare_digest(
            presented.encode(), self.access_token.encode()
        )

    async def init(
        self,
        *,
        env_vars: Mapping[str, str] | None = None,
        access_token: str | None = None,
        default_user: str | None = None,
        default_workdir: str | None = None,
    ) -> None:
        async with self._lock:
            if env_vars is not None:
                self.env_vars = dict(env_vars)
            if access_token is not None:
                self.access_token = access_token
            if default_user is not None:
                self.default_user = default_user
            if default_workdir is not None:
                self.default_workdir = default_workdir
            for listener in self._listeners:
                await listener(self)
