"""Who the load generator runs as when it asks for tokens.

The common path is a service that a `[[clients]]` entry names, not an admin. When the benchmark
runs as root it can be that service: h2load runs under `setpriv` as an unprivileged uid (nobody)
with the daemon's group as a supplementary group (so the 0660 socket admits it), and the config
gets a non-admin `[[clients]]` entry for that uid. Otherwise h2load runs as the daemon's own uid,
which the daemon treats as admin; the tables say which it was.
"""

from __future__ import annotations

import os
import pwd
import shutil
from dataclasses import dataclass
from pathlib import Path

CLIENT_NAME = "bench"
FALLBACK_UID = 65534


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """The uid h2load runs as, and how to get there."""

    uid: int
    gid: int
    admin: bool

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program as this identity (empty: as ourselves)."""
        if self.uid == os.geteuid():
            return []
        setpriv = shutil.which("setpriv") or "setpriv"
        return [
            setpriv,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            f"--groups={os.getegid()}",
            "--",
        ]

    def describe(self) -> str:
        """For the table notes."""
        if self.admin:
            return f"client runs as the daemon's own uid {self.uid} (admin, no [[clients]] lookup)"
        return (
            f"client runs as uid {self.uid} matched by a non-admin [[clients]] entry "
            f'("{CLIENT_NAME}", unix_uid = {self.uid})'
        )

    def clients_toml(self, patterns: list[str]) -> str:
        """The `[[clients]]` entry that admits this identity to `patterns` (none for admin)."""
        if self.admin:
            return ""
        grants = ", ".join(f'"{p}"' for p in patterns)
        return (
            f'\n[[clients]]\nname = "{CLIENT_NAME}"\nunix_uid = {self.uid}\n'
            f"grants = [{grants}]\nadmin = false\n"
        )

    def give(self, path: Path) -> None:
        """Make `path` (a directory for the client's output) the client's own."""
        if self.uid != os.geteuid():
            os.chown(path, self.uid, self.gid)


def token_client() -> ClientIdentity:
    """A non-admin identity when we can switch uid, else our own (admin) uid."""
    if os.geteuid() == 0 and shutil.which("setpriv"):
        try:
            entry = pwd.getpwnam("nobody")
            return ClientIdentity(entry.pw_uid, entry.pw_gid, admin=False)
        except KeyError:
            return ClientIdentity(FALLBACK_UID, FALLBACK_UID, admin=False)
    return ClientIdentity(os.geteuid(), os.getegid(), admin=True)
