"""The image names E2B users write that Coppice answers with its own, offline, bases."""

from __future__ import annotations

import pytest

from coppice.errors import TemplateBuildError
from coppice.images.spec import FromDebian, FromTemplate
from coppice.images.well_known import DEBIAN_PACKAGES, PYTHON_PACKAGES, well_known_base

DEBIAN = FromDebian("bookworm", DEBIAN_PACKAGES)
PYTHON = FromDebian("bookworm", PYTHON_PACKAGES)


@pytest.mark.parametrize("ref", ["e2bdev/base", "e2bdev/base:latest", "docker.io/e2bdev/base"])
def test_e2b_base_is_the_base_template(ref: str) -> None:
    assert well_known_base(ref) == FromTemplate("base")


@pytest.mark.parametrize(
    "ref",
    ["e2bdev/code-interpreter", "e2bdev/code-interpreter:latest", "e2bdev/code-interpreter:1.2"],
)
def test_e2b_code_interpreter_is_its_template(ref: str) -> None:
    assert well_known_base(ref) == FromTemplate("code-interpreter-v1")


def test_another_tag_of_e2b_base_is_fetched() -> None:
    assert well_known_base("e2bdev/base:v0.1") is None


@pytest.mark.parametrize(
    "tag", ["", ":bookworm", ":12", ":stable", ":bookworm-slim", ":12-slim", ":latest"]
)
@pytest.mark.parametrize("prefix", ["", "library/", "docker.io/library/", "docker.io/"])
def test_debian_bookworm_names(prefix: str, tag: str) -> None:
    assert well_known_base(f"{prefix}debian{tag}") == DEBIAN


def test_debian_base_is_minbase_with_ca_certificates_and_the_sandbox_runtime() -> None:
    # The agent runs on the image's python3 and sandboxes serve SSH: a bare `FROM debian`
    # must still become a sandbox.
    assert set(DEBIAN_PACKAGES) == {"ca-certificates", "python3", "openssh-server",
                                    "iproute2", "procps"}  # fmt: skip


@pytest.mark.parametrize("ref", ["debian:bullseye", "debian:11", "debian:trixie", "debian:sid"])
def test_other_debian_releases_are_fetched(ref: str) -> None:
    assert well_known_base(ref) is None


@pytest.mark.parametrize(
    "tag",
    [
        "3",
        "3.11",
        "3-slim",
        "3.11-slim",
        "3-bookworm",
        "3.11-bookworm",
        "3.11-slim-bookworm",
        "3.11.9",
    ],
)
@pytest.mark.parametrize("prefix", ["", "library/", "docker.io/library/"])
def test_python_3_11_names(prefix: str, tag: str) -> None:
    assert well_known_base(f"{prefix}python:{tag}") == PYTHON


def test_python_base_packages() -> None:
    assert set(PYTHON_PACKAGES) == {
        "python3",
        "openssh-server",
        "iproute2",
        "procps",
        "python3-pip",
        "python3-venv",
        "python-is-python3",
        "ca-certificates",
    }


@pytest.mark.parametrize(
    "ref",
    [
        "python:3.12",
        "python:3.13-slim",
        "library/python:3.10-bookworm",
        "python:2.7",
        "python",
        "python:latest",
        "python:slim",
    ],
)
def test_other_python_versions_say_there_is_no_offline_base(ref: str) -> None:
    with pytest.raises(TemplateBuildError) as caught:
        well_known_base(ref)
    message = str(caught.value)
    assert ref in message
    assert "3.11" in message
    assert "bookworm" in message
    assert "oci-archive:" in message


@pytest.mark.parametrize(
    "ref",
    [
        "ubuntu:24.04",
        "ghcr.io/x/y:tag",
        "python:3.11-alpine",  # nothing like Alpine here: the caller fetches it
        "debian@sha256:" + "0" * 64,  # a digest asks for exactly that image
        "python:3.11@sha256:" + "0" * 64,
        "docker://debian:12",  # an explicit transport asks for the registry's image
        "oci-archive:/srv/debian.tar",
        "localhost:5000/debian:12",  # another registry's debian is its own image
        "quay.io/library/debian:12",
        "library/e2bdev/base",
        "mydebian:12",
    ],
)
def test_anything_else_is_left_to_skopeo(ref: str) -> None:
    assert well_known_base(ref) is None
