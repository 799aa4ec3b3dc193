"""The pure parts of OCI bases: naming sources for skopeo, image configs, and the errors a
failed fetch turns into."""

from __future__ import annotations

from pathlib import Path

import pytest

from coppice.errors import PrerequisiteMissing, TemplateBuildError
from coppice.images.oci import registry_failure
from coppice.images.oci_config import ImageDefaults, image_defaults, umoci_config_args
from coppice.images.oci_ref import ImageSource, parse_image_source
from coppice.images.oci_tools import Finished, redact

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("ref", "skopeo"),
    [
        ("ubuntu:24.04", "docker://ubuntu:24.04"),
        ("ghcr.io/x/y:tag", "docker://ghcr.io/x/y:tag"),
        ("localhost:5000/x", "docker://localhost:5000/x"),
        ("docker://ubuntu", "docker://ubuntu"),
        ("oci-archive:/srv/img.tar", "oci-archive:/srv/img.tar"),
        ("oci-archive:/srv/img.tar:v1", "oci-archive:/srv/img.tar:v1"),
        ("oci:/srv/layout:v1", "oci:/srv/layout:v1"),
        ("docker-archive:/srv/d.tar", "docker-archive:/srv/d.tar"),
    ],
)
def test_skopeo_names(ref: str, skopeo: str) -> None:
    assert parse_image_source(ref).skopeo_name() == skopeo


def test_local_paths_are_absolute() -> None:
    source = parse_image_source("oci-archive:img.tar:v1")
    assert source.local_path == Path.cwd().resolve() / "img.tar"
    assert source.skopeo_name() == f"oci-archive:{Path.cwd().resolve() / 'img.tar'}:v1"
    assert parse_image_source("ubuntu").local_path is None


@pytest.mark.parametrize("ref", ["", " ", "docker://", "oci-archive:", "oci::tag"])
def test_empty_references_are_refused(ref: str) -> None:
    with pytest.raises(TemplateBuildError):
        parse_image_source(ref)


@pytest.mark.parametrize("ref", ["dir:/x", "containers-storage:x", "docker-daemon:x:y"])
def test_other_transports_are_refused_by_name(ref: str) -> None:
    with pytest.raises(TemplateBuildError, match="oci-archive:/path"):
        parse_image_source(ref)


@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        ("ubuntu:24.04", f"docker://ubuntu@{DIGEST}"),
        ("ubuntu", f"docker://ubuntu@{DIGEST}"),
        ("localhost:5000/x/y", f"docker://localhost:5000/x/y@{DIGEST}"),
        ("localhost:5000/x/y:t", f"docker://localhost:5000/x/y@{DIGEST}"),
        ("ubuntu@sha256:" + "cd" * 32, "docker://ubuntu@sha256:" + "cd" * 32),
        ("oci-archive:/srv/a.tar:v1", "oci-archive:/srv/a.tar:v1"),
    ],
)
def test_pinning_copies_what_was_inspected(ref: str, pinned: str) -> None:
    assert parse_image_source(ref).pinned(DIGEST).skopeo_name() == pinned


def test_image_defaults_from_a_config() -> None:
    config = {
        "architecture": "amd64",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "A=1=2", "UNSET", "A=3"],
            "WorkingDir": "/app",
            "User": "1000:1000",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
        },
    }
    defaults = image_defaults(config)
    assert defaults.env == (("PATH", "/usr/bin:/bin"), ("A", "3"))
    assert defaults.workdir == "/app"
    assert defaults.user == "1000:1000"
    assert defaults.command == ("/bin/sh", "-c", "echo hi")


def test_an_image_that_says_nothing() -> None:
    assert image_defaults({}) == ImageDefaults()
    blank = {"config": {"Env": None, "WorkingDir": "", "Cmd": None}}
    assert image_defaults(blank) == ImageDefaults()


def test_malformed_config_is_refused() -> None:
    with pytest.raises(TemplateBuildError, match="Cmd"):
        image_defaults({"config": {"Cmd": "echo hi"}})


def test_umoci_config_args_never_look_like_options() -> None:
    defaults = ImageDefaults(
        env=(("A", "1,2"),), workdir="/w", user="u", entrypoint=("-c",), cmd=("--help",)
    )
    assert umoci_config_args(defaults) == [
        "--config.env=A=1,2",
        "--config.workingdir=/w",
        "--config.user=u",
        "--config.entrypoint=-c",
        "--config.cmd=--help",
    ]


def skopeo_said(msg: str, timed_out: bool = False) -> Finished:
    line = f'time="2026-01-01T00:00:00Z" level=fatal msg="{msg}"'
    return Finished(1, b"", (line,), timed_out=timed_out)


REGISTRY = parse_image_source("198.51.100.1:5000/x:y")


@pytest.mark.parametrize(
    "msg",
    [
        'Error parsing image name \\"docker://198.51.100.1:5000/x:y\\": pinging container '
        'registry 198.51.100.1:5000: Get \\"https://198.51.100.1:5000/v2/\\": dial tcp '
        "198.51.100.1:5000: connect: network is unreachable",
        "lookup ghcr.io: no such host",
        "proxyconnect tcp: dial tcp 127.0.0.1:9: connect: connection refused",
    ],
)
def test_an_unreachable_registry_says_what_works_offline(msg: str) -> None:
    error = registry_failure("198.51.100.1:5000/x:y", REGISTRY, skopeo_said(msg))
    assert isinstance(error, TemplateBuildError)
    text = str(error)
    assert "198.51.100.1:5000/x:y" in text
    assert "reach no image registry" in text
    assert "oci-archive:" in text
    assert "e2bdev/base" in text
    assert "Error parsing image name" not in text


def test_a_timeout_is_an_unreachable_registry() -> None:
    error = registry_failure("x/y", REGISTRY, Finished(-1, b"", (), timed_out=True))
    assert "no answer in time" in str(error)
    assert "reach no image registry" in str(error)


def test_a_refusing_registry_names_the_credentials() -> None:
    done = skopeo_said(
        "reading manifest y in 198.51.100.1:5000/x: unauthorized: authentication required"
    )
    assert "fromImageRegistry" in str(registry_failure("x/y", REGISTRY, done))


def test_a_missing_policy_is_a_prerequisite() -> None:
    done = skopeo_said("open /etc/containers/policy.json: no such file or directory")
    error = registry_failure("x/y", REGISTRY, done)
    assert isinstance(error, PrerequisiteMissing)
    assert "scripts/setup" in str(error)


def test_a_bad_name_is_not_called_a_network_problem() -> None:
    done = skopeo_said("invalid reference format: repository name must be lowercase")
    text = str(registry_failure("UPPER/x", REGISTRY, done))
    assert "not an image reference" in text
    assert "registry" not in text.split("(")[0]


def test_local_sources_never_blame_the_network() -> None:
    local = ImageSource("oci-archive", "/srv/a.tar")
    done = skopeo_said("open /srv/a.tar: dial tcp is not a thing here")
    assert "reach no image registry" not in str(
        registry_failure("oci-archive:/srv/a.tar", local, done)
    )


def test_redact_removes_the_password() -> None:
    assert (
        redact("login s3cret failed for s3cret", "s3cret")
        == "login <password> failed for <password>"
    )
    assert redact("nothing", None) == "nothing"
    assert redact("nothing", "") == "nothing"
