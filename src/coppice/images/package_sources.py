"""The package sources this host is configured with, which are all a template build may reach.

Coppice names no registry of its own: a build gets the Debian repositories of the host's apt
sources, the indexes and find-links of the host's pip configuration, the registry of the host's
npm configuration, and whatever the `build_allowed_hosts` setting adds. Where pip or npm is not
configured, what the build gets is what that tool itself would use when unconfigured. Local
sources (`file://` indexes, find-links directories, apt `file:` repositories) are host
directories that the build sandbox sees read-only at the same path, so the same URLs work there.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from coppice.config import Settings
from coppice.errors import InvalidRequest
from coppice.images.mirror import APT_DIR, apt_sources

#: pip's own default index, what `pip install` uses when nothing configures one
PIP_DEFAULT_INDEX_URL = "https://pypi.org/simple"
#: PyPI (pip's default index) links every file to this host, not to itself
PYPI_FILES_HOST = "files.pythonhosted.org"
PYPI_HOST = "pypi.org"
#: npm's own default registry, what `npm install` uses when nothing configures one
NPM_DEFAULT_REGISTRY = "https://registry.npmjs.org/"
#: the setting that adds hosts, named in every refusal so the fix is one edit away
ALLOWED_HOSTS_SETTING = "build_allowed_hosts"

_DEFAULT_PORTS = {"http": 80, "https": 443}
_PIP_TRUE = frozenset({"1", "true", "yes", "on"})
#: what pip reads for `pip install`: the command's own section overrides `global`, and
#: PIP_* environment variables (shown as `:env:`) override both
_PIP_SECTIONS = ("global", "install", ":env:")
_TOOL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PipConfig:
    #: empty when pip is configured with no-index
    index_url: str = PIP_DEFAULT_INDEX_URL
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()


def parse_pip_config_list(text: str) -> PipConfig:
    """Read the output of `pip config list`: one `section.key='value'` line per setting, the
    value as Python's repr of a string."""
    by_section: dict[str, dict[str, str]] = {}
    for raw in text.splitlines():
        name, sep, rendered = raw.strip().partition("=")
        section, dot, key = name.rpartition(".")
        if not sep or not dot:
            continue
        try:
            value = ast.literal_eval(rendered)
        except (ValueError, SyntaxError):
            value = rendered.strip("'\"")
        if not isinstance(value, str):
            continue
        # pip treats index_url and index-url, INDEX-URL alike; so does this
        by_section.setdefault(section, {})[key.lower().replace("_", "-")] = value
    merged: dict[str, str] = {}
    for section in _PIP_SECTIONS:
        merged.update(by_section.get(section, {}))
    no_index = merged.get("no-index", "").strip().lower() in _PIP_TRUE
    return PipConfig(
        index_url="" if no_index else merged.get("index-url", PIP_DEFAULT_INDEX_URL).strip(),
        extra_index_urls=() if no_index else tuple(merged.get("extra-index-url", "").split()),
        find_links=tuple(merged.get("find-links", "").split()),
    )


def parse_allowed_hosts(text: str) -> frozenset[tuple[str, int]]:
    """The `build_allowed_hosts` setting: `host` means ports 80 and 443, `host:port` one port;
    an IPv6 address is written in brackets."""
    found: set[tuple[str, int]] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            split = urlsplit(f"//{item}")
            host, port = split.hostname, split.port
        except ValueError:
            host, port = None, None
        if not host or split.path or split.username is not None:
            raise InvalidRequest(
                f"setting {ALLOWED_HOSTS_SETTING}: {item!r} is not HOST or HOST:PORT "
                "(e.g. pypi.example.org or [2001:db8::1]:8443)"
            )
        host = normal_host(host)
        found.update([(host, port)] if port else [(host, 80), (host, 443)])
    return frozenset(found)


def normal_host(host: str) -> str:
    """A host name as the allow-list compares it: DNS names are case-blind and may end in a dot."""
    return host.strip().strip("[]").rstrip(".").lower()


def url_host(url: str) -> tuple[str, int] | None:
    """The host and port an http(s) URL reaches; None for any other kind of URL. apt's
    transport prefixes (`mirror+http`, `tor+https`) name the scheme after the `+`."""
    try:
        split = urlsplit(url)
        scheme = split.scheme.lower().rpartition("+")[2]
        if scheme not in _DEFAULT_PORTS or not split.hostname:
            return None
        return normal_host(split.hostname), split.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return None


def url_path(url: str) -> Path | None:
    """The host path a local source names (`file://`, apt's `file:` and `copy:`, or a plain
    absolute path); None for a remote or relative one."""
    split = urlsplit(url)
    scheme = split.scheme.lower().rpartition("+")[2]
    if scheme in ("file", "copy"):
        path = unquote(split.path)
    elif not split.scheme:
        path = url
    else:
        return None
    return Path(path) if path.startswith("/") else None


def _index_directory(path: Path) -> Path:
    """The directory to show for a local PEP 503 index. Its pages link files relative to the
    index (`../../files/x.whl`), conventionally beside a `simple/` directory: show the root
    that holds both, or the links would lead nowhere inside the build."""
    return path.parent if path.name == "simple" else path


def _outermost(paths: Iterable[Path]) -> tuple[Path, ...]:
    """Each directory once, and none that another one already contains."""
    unique = sorted(set(paths))
    kept: list[Path] = []
    for path in unique:
        if not any(path.is_relative_to(outer) for outer in kept):
            kept.append(path)
    return tuple(kept)


@dataclass(frozen=True)
class PackageSources:
    #: (host, port) pairs the build's proxy lets through
    hosts: frozenset[tuple[str, int]]
    #: host directories the build sees read-only at the same path
    bind_paths: tuple[Path, ...]
    #: empty when the host's pip is configured with no index at all
    pip_index_url: str
    pip_extra_index_urls: tuple[str, ...]
    pip_find_links: tuple[str, ...]
    npm_registry: str
    apt_uris: tuple[str, ...]

    @classmethod
    def assemble(
        cls,
        apt_uris: Iterable[str],
        pip: PipConfig,
        npm_registry: str,
        extra_hosts: str = "",
        debian_mirror: str = "",
    ) -> PackageSources:
        """The sources from what each tool is configured with; pure, for tests and for
        `from_host`."""
        apt = tuple(dict.fromkeys(apt_uris))
        pip_urls = [u for u in (pip.index_url, *pip.extra_index_urls) if u]
        hosts = set(parse_allowed_hosts(extra_hosts))
        for url in (*apt, *pip_urls, *pip.find_links, npm_registry, debian_mirror):
            reached = url_host(url) if url else None
            if reached is not None:
                hosts.add(reached)
        if any(host == PYPI_HOST for host, _port in hosts):
            hosts.add((PYPI_FILES_HOST, 443))
        binds: list[Path] = []
        for url in pip_urls:
            path = url_path(url)
            if path is not None:
                binds.append(_index_directory(path))
        for url in (*pip.find_links, *apt):
            path = url_path(url)
            if path is not None:
                binds.append(path)
        return cls(
            hosts=frozenset(hosts),
            bind_paths=_outermost(binds),
            pip_index_url=pip.index_url,
            pip_extra_index_urls=pip.extra_index_urls,
            pip_find_links=pip.find_links,
            npm_registry=npm_registry,
            apt_uris=apt,
        )

    @classmethod
    def from_host(cls, settings: Settings, apt_dir: Path = APT_DIR) -> PackageSources:
        """Ask the host's apt, pip and npm what they are configured with, right now."""
        return cls.assemble(
            apt_uris=[source.uri for source in apt_sources(apt_dir)],
            pip=parse_pip_config_list(read_pip_config()),
            npm_registry=read_npm_registry() or NPM_DEFAULT_REGISTRY,
            extra_hosts=settings.build_allowed_hosts,
            # the mirror the builder bootstraps Debian bases from serves their apt too
            debian_mirror=settings.debian_mirror,
        )

    def described_hosts(self) -> str:
        return ", ".join(f"{host}:{port}" for host, port in sorted(self.hosts)) or "none"

    def env(self, proxy_url: str) -> dict[str, str]:
        """What a build command's environment needs to reach these sources through the proxy:
        curl, git, pip and apt read the *_proxy variables; pip and npm are pointed at the
        host's own indexes."""
        env = {
            "http_proxy": proxy_url,
            "https_proxy": proxy_url,
            "HTTP_PROXY": proxy_url,
            "HTTPS_PROXY": proxy_url,
            "no_proxy": "localhost,127.0.0.1",
            "NO_PROXY": "localhost,127.0.0.1",
            "NPM_CONFIG_REGISTRY": self.npm_registry,
            "npm_config_proxy": proxy_url,
            "npm_config_https_proxy": proxy_url,
        }
        if self.pip_index_url:
            env["PIP_INDEX_URL"] = self.pip_index_url
        else:
            env["PIP_NO_INDEX"] = "1"
        if self.pip_extra_index_urls:
            env["PIP_EXTRA_INDEX_URL"] = " ".join(self.pip_extra_index_urls)
        if self.pip_find_links:
            env["PIP_FIND_LINKS"] = " ".join(self.pip_find_links)
        return env

    def apt_proxy_conf(self, proxy_url: str) -> str:
        """An apt.conf.d snippet: apt's own setting, unlike the proxy variables, still holds
        where a command clears its environment on the way (`env -i`, sudo's env_reset)."""
        if '"' in proxy_url or "\n" in proxy_url:
            raise InvalidRequest(f"proxy URL {proxy_url!r} cannot be written into apt.conf")
        return f'Acquire::http::Proxy "{proxy_url}";\nAcquire::https::Proxy "{proxy_url}";\n'


def read_pip_config() -> str:
    """`pip config list` of the host's python3; empty when there is no pip, whose defaults
    then hold."""
    python = shutil.which("python3")
    if python is None:
        return ""
    return _tool_output([python, "-m", "pip", "config", "list"])


def read_npm_registry() -> str | None:
    npm = shutil.which("npm")
    if npm is None:
        return None
    registry = _tool_output([npm, "config", "get", "registry"]).strip()
    return registry if url_host(registry) else None


def _tool_output(argv: list[str]) -> str:
    try:
        # From /, so no project .npmrc of the directory Coppice happens to run in counts.
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT_S,
            cwd="/",
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""
