"""systemd integration without libsystemd: sd_notify messages and socket activation.

`Notifier` speaks the notification protocol (a datagram per message to $NOTIFY_SOCKET) and
knows the watchdog interval systemd asked for; `activated_sockets` takes the sockets systemd
passed in (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES; the first is fd 3). Outside systemd both
do nothing, so the daemon runs the same way from a terminal.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

FIRST_FD = 3  # SD_LISTEN_FDS_START
STATUS_SECONDS = 10.0  # how often STATUS= is refreshed when there is no watchdog to feed
log = structlog.get_logger("broker.systemd")


class Notifier:
    """Sends state changes to systemd; every method is a no-op when not under systemd."""

    def __init__(self, environ: Mapping[str, str], pid: int | None = None) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self._address = address
        self.watchdog_interval = _watchdog_interval(environ, os.getpid() if pid is None else pid)

    @property
    def enabled(self) -> bool:
        """Whether systemd listens."""
        return bool(self._address)

    def send(self, *fields: str) -> bool:
        """One message of `KEY=VALUE` fields; False when nobody listens or it was not sent."""
        if not self._address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop on a full notification queue: drop the message.
            sock.setblocking(False)
            try:
                sock.sendto("\n".join(fields).encode(), self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        """Start-up or a reload is complete."""
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """A one-line status for `systemctl status`."""
        return self.send(f"STATUS={status}")

    def extend_timeout(self, seconds: float, status: str) -> bool:
        """Still starting (waiting for something): do not time the start-up out yet."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", f"STATUS={status}")

    def reloading(self) -> bool:
        """A reload begins; READY=1 ends it. MONOTONIC_USEC lets systemd 253+ match the two."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")

    def stopping(self) -> bool:
        """Shutdown begins."""
        return self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        """The service is healthy: keep the watchdog from firing."""
        return self.send("WATCHDOG=1")


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None without a watchdog for us."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2 / 1_000_000


def activated_sockets(
    environ: Mapping[str, str], pid: int | None = None
) -> dict[str, socket.socket]:
    """The sockets systemd passed to this process, by name ("unknown" when unnamed)."""
    if environ.get("LISTEN_PID") != str(os.getpid() if pid is None else pid):
        return {}
    count = environ.get("LISTEN_FDS", "")
    if not count.isdigit():
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    sockets: dict[str, socket.socket] = {}
    for i in range(int(count)):
        fd = FIRST_FD + i
        os.set_inheritable(fd, False)  # what sd_listen_fds does: not for our children
        name = names[i] if i < len(names) and names[i] else "unknown"
        sockets[name if name not in sockets else f"{name}.{i}"] = socket.socket(fileno=fd)
    return sockets


async def keepalive(
    notifier: Notifier, *, health: Callable[[], str | None], status: Callable[[], str]
) -> None:
    """WATCHDOG=1 every half WATCHDOG_USEC while `health` reports nothing; STATUS= on change.

    A stalled refresh loop withholds the ping, so systemd restarts a daemon that would
    otherwise serve tokens until they all expire.
    """
    period = notifier.watchdog_interval or STATUS_SECONDS
    last_status, withheld = "", False
    while True:
        problem = health()
        if notifier.watchdog_interval is not None:
            if problem is None:
                notifier.watchdog()
                withheld = False
            elif not withheld:
                log.error("watchdog_withheld", reason=problem)
                withheld = True
        text = status() if problem is None else f"unhealthy: {problem}"
        if text != last_status:
            notifier.status(text)
            last_status = text
        await asyncio.sleep(period)
