"""Sealing and opening column values with the keyring, re-read when its file changes.

`token-broker keys rotate` writes a new primary key into the keyring file, then re-seals every
grant with it. A daemon reading that file sees the change before its next seal (the file's
identity, size and modification time are compared first), so it does not go on sealing new
tokens with the old key; an unknown key on opening re-reads it too. A daemon reading a copy of
the file (systemd credentials) sees no change until it restarts: its readiness says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from broker.crypto import Keyring
from broker.errors import DecryptError, KeyringError

log = structlog.get_logger("broker.store.sealing")

Stamp = tuple[int, int, int, int] | None  # the file's device, inode, size, mtime in ns


def file_stamp(path: Path) -> Stamp:
    """What changes when a file is rewritten or replaced; None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Sealer:
    """The keyring as the repositories use it."""

    def __init__(
        self,
        keyring: Keyring,
        reload: Callable[[], Keyring] | None = None,
        stamp: Callable[[], Stamp] | None = None,
    ) -> None:
        self.keyring = keyring
        self._reload = reload
        self._stamp = stamp
        self._seen: Stamp = stamp() if stamp is not None else None

    def seal(self, value: str, *, table: str, row_id: str, column: str) -> bytes:
        """Encrypt with the primary key (the file's, should it have changed), bound to its
        place."""
        if self._stamp is not None:
            self.refresh()
        return self.keyring.seal(value, table=table, row_id=row_id, column=column)

    def refresh(self) -> bool:
        """Re-read the keyring file if it changed and adopt its primary key and new keys (the
        keys already held stay, to open values sealed with them); whether anything changed.
        A file that cannot be read now keeps the keyring in use (readiness reports it)."""
        if self._reload is None or (self._stamp is not None and self._stamp() == self._seen):
            return False
        try:
            return self._reread()
        except (KeyringError, OSError) as exc:  # a seal must not fail for want of a re-read
            log.warning("keyring_unreadable", reason=str(exc), detail="the keys in use stay")
            return False

    def _reread(self) -> bool:
        """Read the keyring file now and adopt its primary key and any key not held yet;
        whether that changed the keyring. KeyringError when the file cannot be used."""
        assert self._reload is not None
        if self._stamp is not None:
            self._seen = self._stamp()
        fresh = self._reload()
        if fresh.primary == self.keyring.primary and set(fresh.keys) <= set(self.keyring.keys):
            return False
        before = self.keyring.primary
        if not set(fresh.keys) >= set(self.keyring.keys):  # keep the keys the file dropped
            fresh = Keyring(fresh.primary, {**self.keyring.keys, **fresh.keys})
        self.keyring = fresh
        log.info("keyring_reloaded", primary=fresh.primary, previous_primary=before)
        return True

    def open(self, envelope: bytes, *, table: str, row_id: str, column: str) -> str:
        """Decrypt; on an unknown key, re-read the keyring once (`keys rotate` may have run)."""
        try:
            return self.keyring.open(envelope, table=table, row_id=row_id, column=column)
        except DecryptError:
            if self._reload is None or not self._reread():
                raise
            return self.keyring.open(envelope, table=table, row_id=row_id, column=column)
