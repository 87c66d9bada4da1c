"""Binding the API's Unix socket: the configured mode from the first instant, no stolen sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from broker.errors import StartupError

# Connections the kernel queues before the daemon accepts them; capped by net.core.somaxconn.
# A burst of callers beyond the queue is refused (EAGAIN on a Unix socket), so it is as deep as
# the kernel allows. Every site passes it on: asyncio calls listen() again when it starts
# serving, with aiohttp's default of 128 unless told otherwise, on bound and passed sockets alike.
BACKLOG = socket.SOMAXCONN


@dataclass(frozen=True, slots=True)
class UnixListener:
    """A bound, listening Unix socket and the inode of the file it created."""

    path: Path
    sock: socket.socket
    inode: int

    def remove(self) -> None:
        """Close, and unlink the socket file unless another one has replaced it since."""
        self.sock.close()
        with contextlib.suppress(OSError):
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()


def bind_unix(path: Path, mode: int) -> UnixListener:
    """A listening Unix socket at `path` with permissions `mode`.

    A stale socket file left by a crash is replaced; one that a live process still answers on
    is refused. The umask is narrowed around bind() so the file is created with `mode` and is
    never, even briefly, more open than that.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(~mode & 0o777)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        path.chmod(mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    return UnixListener(path=path, sock=sock, inode=path.lstat().st_ino)


def _clear_stale(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(
            f"{path} exists and is not a socket; move it away or change server.socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: left by a crashed daemon
        return
    except OSError as exc:
        raise StartupError(f"cannot check the existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError(f"another process is already serving on {path}; stop it first")
