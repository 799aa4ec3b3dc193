"""The image names E2B users write most, answered by Coppice's own bases so that they build
offline: E2B's own images are Coppice's templates, and Debian's and Python's official images
are debootstrapped bookworm roots with the same packages in them.

Only bare names are read this way. `docker://debian:12`, a digest (`debian@sha256:...`) or a
variant Coppice cannot match (`python:3.11-alpine`) asks for that exact image: `None`, and
the caller fetches it with skopeo.
"""

from __future__ import annotations

import re

from coppice.errors import TemplateBuildError
from coppice.images.spec import FromDebian, FromTemplate

SUITE = "bookworm"
#: the Python that bookworm ships, and so the only one its bases have
DEBIAN_PYTHON = "3.11"
#: what every sandbox runs whatever its image: the in-sandbox agent's Python (3.11) and
#: sshd. E2B puts its own agent into every image too; these are Coppice's.
SANDBOX_RUNTIME = ("python3", "openssh-server", "iproute2", "procps")
#: on top of debootstrap's minbase: what a `debian` image has that minbase lacks and
#: almost every build needs (HTTPS to anything), and the sandbox runtime
DEBIAN_PACKAGES = ("ca-certificates", *SANDBOX_RUNTIME)
#: what the `python` images give: pip, venv and `python` as well as `python3`
PYTHON_PACKAGES = (
    *SANDBOX_RUNTIME,
    "python3-pip",
    "python3-venv",
    "python-is-python3",
    "ca-certificates",
)
E2B_TEMPLATES = {
    # e2bdev/base's only published tag is `latest`; another tag is another image.
    "e2bdev/base": ("base", frozenset({"latest"})),
    # Every tag of the code interpreter is the same interface, which the template serves.
    "e2bdev/code-interpreter": ("code-interpreter-v1", None),
}
DEBIAN_TAGS = frozenset(
    {"latest", "bookworm", "12", "stable", "bookworm-slim", "12-slim", "stable-slim"}
)
#: Python tags without a version: the newest Python, whatever it is
PYTHON_UNVERSIONED = frozenset({"latest", "slim", "bookworm", "slim-bookworm"})
PYTHON_VARIANTS = frozenset({"", "slim", "bookworm", "slim-bookworm"})
PYTHON_MATCHING = re.compile(r"3(\.11(\.\d+)?)?")
VERSION = re.compile(r"\d+(\.\d+)*")


def well_known_base(ref: str) -> FromDebian | FromTemplate | None:
    """Coppice's own base for image `ref`, or None when it has none and skopeo should fetch
    it. Raises for a Python version no offline base can give."""
    if "@" in ref:
        return None
    name, tag = _split(ref)
    name = name.removeprefix("docker.io/")
    if name in E2B_TEMPLATES:
        template, tags = E2B_TEMPLATES[name]
        return FromTemplate(template) if tags is None or tag in tags else None
    # Official images live under `library/`, which registries let you leave out.
    name = name.removeprefix("library/")
    if name == "debian":
        return FromDebian(SUITE, DEBIAN_PACKAGES) if tag in DEBIAN_TAGS else None
    if name == "python":
        return _python_base(ref, tag)
    return None


def _python_base(ref: str, tag: str) -> FromDebian | None:
    if tag in PYTHON_UNVERSIONED:
        version, variant = "latest", ""
    else:
        version, _, variant = tag.partition("-")
        if not VERSION.fullmatch(version):
            return None
    if variant not in PYTHON_VARIANTS:
        return None  # alpine, bullseye, ...: an image Coppice has nothing like
    if PYTHON_MATCHING.fullmatch(version):
        # `3` and `3.11.N` too: the same minor version, so the same wheels and ABI.
        return FromDebian(SUITE, PYTHON_PACKAGES)
    shown = "the newest Python" if version == "latest" else f"Python {version}"
    raise TemplateBuildError(
        f"image {ref}: {shown} has no offline base here (Coppice's Python base is Debian "
        f"{SUITE}'s, which ships Python {DEBIAN_PYTHON}); use python:{DEBIAN_PYTHON} "
        "(or python:3), or an oci-archive:/path of the image you want"
    )


def _split(ref: str) -> tuple[str, str]:
    """(name, tag) of a reference; the tag defaults to `latest`. A ':' before the last '/'
    is a registry's port, not a tag."""
    head, slash, last = ref.rpartition("/")
    base, colon, tag = last.partition(":")
    return f"{head}{slash}{base}", (tag if colon else "latest")
