"""Find the Debian mirror the host's apt configuration already uses.

Coppice never names a mirror of its own: it builds templates from wherever this host gets
its Debian packages (one-line `.list` files and deb822 `.sources` files both count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coppice.errors import PrerequisiteMissing

APT_DIR = Path("/etc/apt")
_APT_FALSE = frozenset({"no", "false", "off", "without", "disable", "0"})


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def _one_line_sources(text: str) -> list[AptSource]:
    found = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        words = line.split()[1:]
        if words and words[0].startswith("["):  # options such as [signed-by=...]
            closing = next((i for i, w in enumerate(words) if w.endswith("]")), None)
            if closing is None:
                continue  # apt rejects such a line too
            words = words[closing + 1 :]
        if len(words) >= 3:
            found.append(AptSource(words[0], (words[1],), tuple(words[2:])))
    return found


def _deb822_sources(text: str) -> list[AptSource]:
    found = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            if raw.startswith("#") or ":" not in raw or raw[:1].isspace():
                continue
            key, _, value = raw.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in _APT_FALSE:
            continue
        for uri in fields.get("uris", "").split():
            found.append(
                AptSource(
                    uri,
                    tuple(fields.get("suites", "").split()),
                    tuple(fields.get("components", "").split()),
                )
            )
    return found


def apt_sources(apt_dir: Path = APT_DIR) -> list[AptSource]:
    sources: list[AptSource] = []
    main = apt_dir / "sources.list"
    if main.is_file():
        sources += _one_line_sources(main.read_text())
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += _one_line_sources(path.read_text())
            elif path.suffix == ".sources":
                sources += _deb822_sources(path.read_text())
    return sources


def debian_mirror(suite: str, apt_dir: Path = APT_DIR) -> str:
    """The first configured URI that serves `suite` with component main."""
    for source in apt_sources(apt_dir):
        if suite in source.suites and "main" in source.components:
            return source.uri
    raise PrerequisiteMissing(
        f"the host's apt configuration names no Debian mirror for {suite} main; add one "
        f"under {apt_dir}/sources.list.d/ or set COPPICE_DEBIAN_MIRROR"
    )
