"""Where an OCI image comes from, in the words skopeo understands.

Accepted: `oci-archive:/path[:tag]`, `oci:/dir[:tag]`, `docker-archive:/path[:ref]`,
`docker://ref`, and a bare registry reference (`ubuntu:24.04`, `ghcr.io/x/y:tag`), which
means `docker://`. Every name handed to skopeo starts with its transport, so nothing a user
writes can be read by skopeo as one of its own options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coppice.errors import TemplateBuildError

Transport = Literal["docker", "oci-archive", "oci", "docker-archive"]
LOCAL_TRANSPORTS: tuple[Transport, ...] = ("oci-archive", "oci", "docker-archive")
#: skopeo transports Coppice does not fetch from. Named so that `dir:/x` is refused with a
#: reason instead of being taken for a registry host called `dir`.
OTHER_TRANSPORTS = ("dir", "containers-storage", "docker-daemon", "ostree", "sif", "tarball")
ACCEPTED_FORMS = (
    "oci-archive:/path[:tag], oci:/dir[:tag], docker-archive:/path, docker://name[:tag] "
    "or a bare name[:tag]"
)


@dataclass(frozen=True)
class ImageSource:
    transport: Transport
    #: what follows the transport: `/path[:tag]`, or a registry reference (no `//`)
    reference: str

    @property
    def is_registry(self) -> bool:
        return self.transport == "docker"

    @property
    def local_path(self) -> Path | None:
        """The archive or layout a local source reads; None for a registry."""
        if self.is_registry:
            return None
        # skopeo splits these at the first colon too: what follows is the tag.
        return Path(self.reference.split(":", 1)[0])

    def skopeo_name(self) -> str:
        if self.is_registry:
            return f"docker://{self.reference}"
        return f"{self.transport}:{self.reference}"

    def pinned(self, digest: str) -> ImageSource:
        """The same image by digest, so that what is copied is what was inspected even if
        the tag moves in between. Local sources are read as they are."""
        if not self.is_registry or "@" in self.reference:
            return self
        name = self.reference
        if ":" in name.rsplit("/", 1)[-1]:  # a tag, not a registry's port
            name = name[: name.rindex(":")]
        return ImageSource("docker", f"{name}@{digest}")


def parse_image_source(ref: str) -> ImageSource:
    if not ref.strip():
        raise TemplateBuildError(f"no image reference given; give {ACCEPTED_FORMS}")
    if ref.startswith("docker://"):
        rest = ref.removeprefix("docker://")
        if not rest:
            raise TemplateBuildError(f"{ref!r} names no image; write docker://name[:tag]")
        return ImageSource("docker", rest)
    prefix, colon, rest = ref.partition(":")
    for transport in LOCAL_TRANSPORTS:
        if colon and prefix == transport:
            if not rest or rest.startswith(":"):
                raise TemplateBuildError(f"{ref!r} names no path; write {transport}:/path/to/image")
            # Resolved here, not in skopeo: a relative path would be relative to whichever
            # process happens to run the build.
            path, tag_colon, tag = rest.partition(":")
            return ImageSource(transport, f"{Path(path).resolve()}{tag_colon}{tag}")
    if colon and prefix in OTHER_TRANSPORTS:
        raise TemplateBuildError(
            f"image {ref!r}: Coppice does not fetch from skopeo's {prefix}: transport; "
            f"give {ACCEPTED_FORMS}"
        )
    return ImageSource("docker", ref)
