"""The jail substrate running template builds: each build command in a user namespace that
maps root to the jail id range, bwrap's mount/pid/ipc/uts namespaces, the jail's
capabilities and seccomp filter, and a cgroup with limits, over the image being built.

Its only network is the package sources the host is configured with, through the build
network's proxy; without one it has none at all. Files go wherever the command writes
them, which is the step's new layer (the overlay's upper directory).
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from coppice.config import Limits, Settings
from coppice.errors import SubstrateError, TemplateBuildError
from coppice.images.build_sandbox import Account, SandboxFactory
from coppice.images.builder import TemplateBuilder
from coppice.net.build_link import BuildNetwork
from coppice.progress import Progress
from coppice.store.store import Store
from coppice.substrates import cgroups, seccomp
from coppice.substrates.jail import DEFAULT_PATH, ensure_subordinate_ids, isolation_argv

#: runs as the sandbox's root; drops to the step's user with the image's own tools
AS_USER = (
    'if [ "$1" = 0 ]; then shift 4; exec /bin/sh -c "$1"; fi; '
    "if command -v setpriv >/dev/null 2>&1; then "
    'exec setpriv --reuid="$1" --regid="$2" --init-groups -- /bin/sh -c "$5"; fi; '
    'exec su -s /bin/sh -c "$5" "$3"'
)
#: where the host's local package sources and CA bundle appear in a build sandbox
SOURCES = "/run/coppice-sources"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CA_ENV = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
          "GIT_SSL_CAINFO", "NODE_EXTRA_CA_CERTS", "npm_config_cafile")  # fmt: skip
JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'


class BuildJail:
    """One per build: a cgroup of its own (its own parent, so pool reconciles never see it)
    shared by every command of the build."""

    def __init__(
        self,
        settings: Settings,
        limits: Limits,
        with_network: bool = True,
        step_timeout_s: float = 1800.0,
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.with_network = with_network
        self.network: BuildNetwork | None = None
        self.step_timeout_s = step_timeout_s
        self.name = f"build-{secrets.token_hex(4)}"
        self._cgroups = cgroups.detect(f"{settings.namespace}-build")

    def __enter__(self) -> BuildJail:
        ensure_subordinate_ids(self.settings)
        with contextlib.ExitStack() as stack:
            self._cgroups.prepare()
            self._cgroups.create(self.name, self.limits)
            stack.callback(self._remove_cgroup)
            if self.with_network:
                self.network = stack.enter_context(BuildNetwork(self.settings, self.name))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _remove_cgroup(self) -> None:
        try:
            self._cgroups.kill_all(self.name)
        finally:
            self._cgroups.remove(self.name)
        # The parent goes with the last build; another build's cgroup keeps it busy.
        with contextlib.suppress(SubstrateError):
            self._cgroups.remove_parent()

    def run(
        self,
        root: Path,
        command: str,
        user: Account,
        workdir: str,
        env: Mapping[str, str],
        on_line: Callable[[str], None],
        binds: Sequence[tuple[Path, str]] = (),
    ) -> tuple[int, tuple[str, ...]]:
        """Run `command` with /bin/sh in the image at `root`; returns its exit status and
        its last lines of output. `binds`: host directories shown read-only at a path under
        /run (a tmpfs, so nothing of them lands in the layer)."""
        filter_path = seccomp.ensure_filter_file(self.settings.run_dir)
        filter_fd = os.open(filter_path, os.O_RDONLY)
        tail: collections.deque[str] = collections.deque(maxlen=30)
        try:
            argv = self._argv(root, command, user, workdir, env, binds, filter_fd)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(filter_fd,),
                start_new_session=True,
            )
        finally:
            os.close(filter_fd)
        deadline = time.monotonic() + self.step_timeout_s
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                tail.append(line)
                on_line(line)
                if time.monotonic() > deadline:
                    raise TemplateBuildError(
                        f"the step ran longer than {self.step_timeout_s:.0f} s",
                        log_tail=tuple(tail),
                    )
            status = proc.wait()
        except BaseException:
            self._stop(proc)
            raise
        return status, tuple(tail)

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._cgroups.kill_all(self.name)
        proc.wait()

    def _source_binds(self) -> list[tuple[Path, str]]:
        """Local package sources (a wheel directory, a file:// index) and the host's CA
        bundle, shown under /run (a tmpfs): the image keeps no trace of them."""
        if self.network is None:
            return []
        found = [(p, f"{SOURCES}/{i}") for i, p in enumerate(self.network.sources.bind_paths)]
        if HOST_CA_BUNDLE.is_file():
            found.append((HOST_CA_BUNDLE, f"{SOURCES}/ca.crt"))
        return [(host, inside) for host, inside in found if host.exists()]

    def _source_env(self) -> dict[str, str]:
        if self.network is None:
            return {}
        env = self.network.sources.env(self.network.proxy_url)
        moved = sorted(self._source_binds(), key=lambda b: -len(str(b[0])))
        for key, value in env.items():
            for host, inside in moved:
                value = value.replace(str(host), inside)
            env[key] = value
        if HOST_CA_BUNDLE.is_file():
            # The host's trust is what reaches its package sources (a TLS-inspecting proxy
            # on the way included); the image's own bundle may not know that CA.
            ca = f"{SOURCES}/ca.crt"
            for key in CA_ENV:
                env[key] = ca
        return env

    def _argv(
        self,
        root: Path,
        command: str,
        user: Account,
        workdir: str,
        env: Mapping[str, str],
        binds: Sequence[tuple[Path, str]],
        seccomp_fd: int,
    ) -> list[str]:
        s = self.settings
        prefix: list[str] = []
        net: list[str] = ["--unshare-net"]
        if self.network is not None:
            prefix = ["nsenter", f"--net={self.network.netns_path}", "--"]
            net = []
        binds_argv: list[str] = []
        for host, inside in [*self._source_binds(), *binds]:
            binds_argv += ["--ro-bind", str(host), inside]
        base_env = {
            "PATH": DEFAULT_PATH,
            "HOME": user.home if user.uid else "/root",
            "USER": user.name,
            "LOGNAME": user.name,
            "DEBIAN_FRONTEND": "noninteractive",
        }
        base_env.update(self._source_env())
        base_env.update(env)
        env_argv: list[str] = []
        for k, v in base_env.items():
            env_argv += ["--setenv", k, v]
        return [
            *prefix,
            "sh", "-c", JOIN_CGROUPS, "sh",
            *(str(p) for p in self._cgroups.join_files(self.name)),
            "--",
            *isolation_argv(
                s,
                root,
                "coppice-build",
                seccomp_fd,
                self.limits,
                [*binds_argv, *net, "--die-with-parent", *env_argv, "--chdir", workdir],
            ),
            "--",
            "/bin/sh", "-c", AS_USER, "sh",
            str(user.uid), str(user.gid), user.name, user.home, command,
        ]  # fmt: skip


def build_sandboxes(settings: Settings) -> SandboxFactory:
    def make(limits: Limits, with_network: bool) -> BuildJail:
        return BuildJail(settings, limits, with_network)

    return make


def template_builder(
    settings: Settings, store: Store, progress: Progress | None = None
) -> TemplateBuilder:
    """The template builder with its steps run in build jails."""
    return TemplateBuilder(settings, store, progress, sandboxes=build_sandboxes(settings))
