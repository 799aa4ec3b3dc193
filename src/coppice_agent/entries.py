"""`EntryInfo` for a path, shaped like envd's: a symlink reports its target's type, size,
mode and user metadata, flagged with `isSymlink` and the resolved `symlinkTarget` (what newer
envd does and the SDK maps back to SYMLINK)."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from coppice_agent.metadata import read_metadata
from coppice_agent.rpc.filesystem.filesystem_pb import EntryInfo, FileType


def entry_info(path: str) -> EntryInfo:
    """Describe `path` (absolute). Raises FileNotFoundError like os.lstat."""
    link = os.lstat(path)
    is_symlink = stat.S_ISLNK(link.st_mode)
    info = link
    target: str | None = None
    if is_symlink:
        target = os.path.realpath(path)
        try:
            info = Path(path).stat()
        except OSError:
            info = link  # dangling: describe the link itself
    return EntryInfo(
        name=Path(path).name or path,
        type=_file_type(info.st_mode),
        path=path,
        size=info.st_size,
        mode=stat.S_IMODE(info.st_mode) & 0o777,
        permissions=stat.filemode(info.st_mode),
        owner=_user_name(info.st_uid),
        group=_group_name(info.st_gid),
        modified_time=Timestamp.from_nanos(info.st_mtime_ns),
        symlink_target=target,
        metadata=read_metadata(path),
        is_symlink=is_symlink,
    )


def _file_type(mode: int) -> FileType:
    if stat.S_ISDIR(mode):
        return FileType.DIRECTORY
    if stat.S_ISLNK(mode):
        return FileType.SYMLINK
    # Sockets, FIFOs and devices are files as far as the SDK's types go.
    return FileType.FILE


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
