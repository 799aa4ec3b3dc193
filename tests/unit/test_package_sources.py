"""What a template build may reach: the host's apt, pip and npm configuration, read and turned
into an allow-list, bind mounts, environment variables and an apt.conf snippet."""

from __future__ import annotations

from pathlib import Path

import pytest

from coppice.config import Settings
from coppice.errors import InvalidRequest
from coppice.images import package_sources
from coppice.images.mirror import apt_sources
from coppice.images.package_sources import (
    NPM_DEFAULT_REGISTRY,
    PIP_DEFAULT_INDEX_URL,
    PackageSources,
    PipConfig,
    parse_allowed_hosts,
    parse_pip_config_list,
    url_host,
    url_path,
)

#: `python3 -m pip config list` as pip prints it: repr'd values, env variables as `:env:`
PIP_CONFIG_LIST = """\
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.extra-index-url='file:///opt/pypi/simple https://pypi.example.org/extra/simple'
global.index-url='https://pypi.example.org/simple'
"""

DEB822 = """\
Types: deb
URIs: http://deb.example.org/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: https://security.example.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_pip_config_list_is_read_with_pips_precedence() -> None:
    pip = parse_pip_config_list(PIP_CONFIG_LIST)
    assert pip.index_url == "https://pypi.example.org/simple"
    assert pip.extra_index_urls == (
        "file:///opt/pypi/simple",
        "https://pypi.example.org/extra/simple",
    )
    assert pip.find_links == ("/opt/wheels",)


def test_pip_install_section_and_environment_override_global() -> None:
    pip = parse_pip_config_list(
        "global.index-url='https://a.example/simple'\n"
        "install.index-url='https://b.example/simple'\n"
        "global.find-links='/srv/one'\n"
        ":env:.find_links='/srv/two /srv/three'\n"
    )
    assert pip.index_url == "https://b.example/simple"
    assert pip.find_links == ("/srv/two", "/srv/three")


def test_unconfigured_pip_means_pips_own_default_index() -> None:
    assert parse_pip_config_list("") == PipConfig(PIP_DEFAULT_INDEX_URL, (), ())
    assert parse_pip_config_list("not a setting\n=x\n") == PipConfig()


def test_pip_no_index_drops_every_index() -> None:
    pip = parse_pip_config_list(
        "global.no-index='true'\nglobal.extra-index-url='https://x.example/simple'\n"
        "global.find-links='/opt/wheels'\n"
    )
    assert pip == PipConfig("", (), ("/opt/wheels",))


def test_url_host_and_path() -> None:
    assert url_host("https://Pypi.Example.org./simple") == ("pypi.example.org", 443)
    assert url_host("http://deb.example.org/debian") == ("deb.example.org", 80)
    assert url_host("mirror+http://deb.example.org:8080/list") == ("deb.example.org", 8080)
    assert url_host("http://[2001:db8::1]:3142/debian") == ("2001:db8::1", 3142)
    assert url_host("file:///opt/pypi/simple") is None
    assert url_host("/opt/wheels") is None
    assert url_path("file:///opt/pypi%20more/simple") == Path("/opt/pypi more/simple")
    assert url_path("file:/srv/apt-repo") == Path("/srv/apt-repo")
    assert url_path("/opt/wheels") == Path("/opt/wheels")
    assert url_path("wheels") is None
    assert url_path("https://pypi.example.org/simple") is None


def test_allowed_hosts_setting() -> None:
    assert parse_allowed_hosts("") == frozenset()
    assert parse_allowed_hosts(" git.example.org , Files.Example.org:8443,[2001:db8::2]:81") == {
        ("git.example.org", 80),
        ("git.example.org", 443),
        ("files.example.org", 8443),
        ("2001:db8::2", 81),
    }
    for bad in ("http://x.example", "x.example:port", "x.example/path", "user@x.example"):
        with pytest.raises(InvalidRequest, match="build_allowed_hosts"):
            parse_allowed_hosts(bad)


def test_assembled_from_the_hosts_configuration(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list").write_text("deb [trusted=yes] file:/srv/apt-repo ./ main\n")
    sources = PackageSources.assemble(
        apt_uris=[s.uri for s in apt_sources(tmp_path)],
        pip=parse_pip_config_list(PIP_CONFIG_LIST),
        npm_registry="https://npm.example.org/",
        extra_hosts="git.example.org:443",
    )
    assert sources.hosts == {
        ("deb.example.org", 80),
        ("security.example.org", 443),
        ("pypi.example.org", 443),
        ("npm.example.org", 443),
        ("git.example.org", 443),
    }
    # The local index is shown with the directory beside `simple/` its pages link files from.
    assert sources.bind_paths == (Path("/opt/pypi"), Path("/opt/wheels"), Path("/srv/apt-repo"))
    assert sources.apt_uris == (
        "file:/srv/apt-repo",
        "http://deb.example.org/debian",
        "https://security.example.org/debian-security",
    )
    assert sources.npm_registry == "https://npm.example.org/"


def test_pip_and_npm_defaults_are_their_own() -> None:
    sources = PackageSources.assemble([], PipConfig(), NPM_DEFAULT_REGISTRY)
    assert sources.hosts == {
        ("pypi.org", 443),
        ("files.pythonhosted.org", 443),  # where pip's default index serves its files from
        ("registry.npmjs.org", 443),
    }
    assert sources.bind_paths == ()


def test_nested_bind_paths_collapse() -> None:
    pip = PipConfig("file:///srv/pypi/simple", (), ("/srv/pypi/files", "/srv/pypi"))
    sources = PackageSources.assemble([], pip, NPM_DEFAULT_REGISTRY)
    assert sources.bind_paths == (Path("/srv/pypi"),)


def test_from_host_asks_each_tool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(package_sources, "read_pip_config", lambda: PIP_CONFIG_LIST)
    monkeypatch.setattr(package_sources, "read_npm_registry", lambda: None)
    settings = Settings(
        build_allowed_hosts="extra.example.org", debian_mirror="http://mirror.example.org/d"
    )
    sources = PackageSources.from_host(settings, apt_dir=tmp_path)
    assert sources.npm_registry == NPM_DEFAULT_REGISTRY
    assert {("extra.example.org", 80), ("mirror.example.org", 80)} <= sources.hosts
    assert ("registry.npmjs.org", 443) in sources.hosts
    assert sources.apt_uris == ()


def test_env_points_every_tool_at_the_proxy_and_the_hosts_indexes() -> None:
    sources = PackageSources.assemble(
        [], parse_pip_config_list(PIP_CONFIG_LIST), "https://npm.example.org/"
    )
    env = sources.env("http://10.79.240.1:41000")
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        assert env[name] == "http://10.79.240.1:41000"
    assert env["no_proxy"] == "localhost,127.0.0.1"
    assert env["PIP_INDEX_URL"] == "https://pypi.example.org/simple"
    assert env["PIP_EXTRA_INDEX_URL"] == (
        "file:///opt/pypi/simple https://pypi.example.org/extra/simple"
    )
    assert env["PIP_FIND_LINKS"] == "/opt/wheels"
    assert env["NPM_CONFIG_REGISTRY"] == "https://npm.example.org/"
    assert env["npm_config_https_proxy"] == "http://10.79.240.1:41000"
    assert "PIP_NO_INDEX" not in env


def test_env_of_a_host_with_no_pip_index() -> None:
    env = PackageSources.assemble([], PipConfig(""), NPM_DEFAULT_REGISTRY).env("http://p:1")
    assert env["PIP_NO_INDEX"] == "1"
    assert "PIP_INDEX_URL" not in env
    assert "PIP_EXTRA_INDEX_URL" not in env


def test_apt_proxy_conf() -> None:
    sources = PackageSources.assemble([], PipConfig(), NPM_DEFAULT_REGISTRY)
    assert sources.apt_proxy_conf("http://10.79.240.1:41000") == (
        'Acquire::http::Proxy "http://10.79.240.1:41000";\n'
        'Acquire::https::Proxy "http://10.79.240.1:41000";\n'
    )
    with pytest.raises(InvalidRequest):
        sources.apt_proxy_conf('http://x";\nAPT::Evil "1')
