"""Replacing a sink's file so that no reader sees a part, and no file is looser than its mode.

Blocking file-system calls only; `broker.sinks` runs them in a thread. Temporary files are
named `.NAME.XXXXXXXX.tmp` beside the file, so one a killed process left can be swept.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

_TEMP_SUFFIX = ".tmp"


def write_atomic(path: Path, data: bytes, mode: int, owner: int | None, group: int | None) -> None:
    """Replace `path` with `data` so that no reader sees a part and no file is looser than
    `mode`: temporary file (created without permissions), group, mode, owner, fsync, rename,
    fsync of the directory.

    The mode is set while the daemon still owns the file (changing the mode of another user's
    file needs CAP_FOWNER; giving it away needs only CAP_CHOWN), and after its group, so the
    group bits never apply to the daemon's own group."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            _chown(fd, None, group)
            os.fchmod(fd, mode)
            _chown(fd, owner, None)
            os.fsync(fd)
        finally:
            os.close(fd)
        temp.rename(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_directory(path.parent)


def _chown(fd: int, owner: int | None, group: int | None) -> None:
    # Only what differs: a file made in a setgid directory may already have the wanted group,
    # and a daemon without CAP_CHOWN can then still write the sink.
    if owner is None and group is None:
        return
    stat = os.fstat(fd)
    uid = -1 if owner is None or owner == stat.st_uid else owner
    gid = -1 if group is None or group == stat.st_gid else group
    if (uid, gid) != (-1, -1):
        os.fchown(fd, uid, gid)


def _fsync_directory(directory: Path) -> None:
    # The rename is done and visible; this only makes it survive a power cut, which not
    # every file system supports for directories.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: Path) -> bool:
    """Remove the sink file; whether there was one."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_directory(path.parent)
    return True


def sweep_leftovers(path: Path) -> int:
    """Remove temporary files a killed daemon left beside `path`; how many."""
    prefix = f".{path.name}."
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            name = entry.name
            hex_part = name[len(prefix) : -len(_TEMP_SUFFIX)]
            if name.startswith(prefix) and name.endswith(_TEMP_SUFFIX) and len(hex_part) == 8:
                with contextlib.suppress(OSError):
                    Path(entry.path).unlink()
                    removed += 1
    return removed


def describe(exc: Exception) -> str:
    """Why a file operation failed, in words: the system's reason, never the error's own text
    (which names temporary paths, and for anything unexpected may quote what it handled)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"unexpected {type(exc).__name__}"
