"""User metadata on files (envd 0.6.2): `X-Metadata-<key>: <value>` upload headers, kept as
`user.e2b.<key>` extended attributes and reported in every `EntryInfo`.

The `user.e2b.` namespace, not bare `user.`: the SDK documents it, envd's 246-byte key limit is
the VFS's 255 minus exactly that prefix, and "each upload replaces the metadata" must not wipe
`user.*` attributes other software put on the file."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping

HEADER_PREFIX = b"x-metadata-"
XATTR_PREFIX = "user.e2b."
MAX_KEY_BYTES = 246
MAX_TOTAL_BYTES = 4096

# Filesystems without user xattrs (tmpfs before Linux 6.6, /proc, vfat): there is no metadata
# there, and none to clear.
_UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})


class InvalidMetadata(ValueError):
    """The request's metadata headers break envd's rules."""


def metadata_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The metadata an upload's raw headers carry, keys lowercased, the first of a repeated
    header winning. Raises `InvalidMetadata`."""
    metadata: dict[str, str] = {}
    for name, value in headers:
        if not name.lower().startswith(HEADER_PREFIX):
            continue
        key = name[len(HEADER_PREFIX) :].lower()
        if not key:
            raise InvalidMetadata("a metadata header has an empty key (X-Metadata-)")
        _check_printable(key, "key")
        if len(key) > MAX_KEY_BYTES:
            raise InvalidMetadata(f"metadata key is longer than {MAX_KEY_BYTES} bytes")
        _check_printable(value, f"value of {key.decode()!r}")
        metadata.setdefault(key.decode(), value.decode())
    total = sum(len(XATTR_PREFIX) + len(k) + len(v) for k, v in metadata.items())
    if total > MAX_TOTAL_BYTES:
        raise InvalidMetadata(
            f"metadata takes {total} bytes with the {XATTR_PREFIX!r} prefix of each key; "
            f"at most {MAX_TOTAL_BYTES} fit"
        )
    return metadata


def _check_printable(raw: bytes, what: str) -> None:
    if any(byte < 0x20 or byte > 0x7E for byte in raw):
        raise InvalidMetadata(f"metadata {what} must be printable US-ASCII (0x20-0x7E)")


def read_metadata(path: str) -> dict[str, str]:
    """The metadata on `path` (a symlink's target's). Reading it never fails a lookup: where
    attributes cannot be read, there is none."""
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata: dict[str, str] = {}
    for name in names:
        if not name.startswith(XATTR_PREFIX):
            continue
        try:
            value = os.getxattr(path, name)
        except OSError:
            continue  # removed since the listing
        # Set out of band, a value need not be text; the map's values must be.
        metadata[name[len(XATTR_PREFIX) :]] = value.decode("utf-8", "replace")
    return metadata


def replace_metadata(fd: int, metadata: Mapping[str, str]) -> None:
    """Make `metadata` the open file's whole metadata. Raises OSError."""
    try:
        present = {name for name in os.listxattr(fd) if name.startswith(XATTR_PREFIX)}
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        present = set()
    wanted = {XATTR_PREFIX + key: value.encode() for key, value in metadata.items()}
    for name in present - wanted.keys():
        os.removexattr(fd, name)
    for name, value in wanted.items():
        os.setxattr(fd, name, value)


def unsupported(exc: OSError) -> bool:
    """Whether `exc` says the filesystem keeps no user extended attributes."""
    return exc.errno in _UNSUPPORTED
