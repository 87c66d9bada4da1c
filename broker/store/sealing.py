"""Sealing and opening column values with the keyring, re-reading it once on an unknown key."""

from __future__ import annotations

from collections.abc import Callable

from broker.crypto import Keyring
from broker.errors import DecryptError


class Sealer:
    """The keyring as the repositories use it."""

    def __init__(self, keyring: Keyring, reload: Callable[[], Keyring] | None = None) -> None:
        self.keyring = keyring
        self._reload = reload

    def seal(self, value: str, *, table: str, row_id: str, column: str) -> bytes:
        """Encrypt with the primary key, bound to its place."""
        return self.keyring.seal(value, table=table, row_id=row_id, column=column)

    def open(self, envelope: bytes, *, table: str, row_id: str, column: str) -> str:
        """Decrypt; on an unknown key, re-read the keyring once (`keys rotate` may have run)."""
        try:
            return self.keyring.open(envelope, table=table, row_id=row_id, column=column)
        except DecryptError:
            if self._reload is None:
                raise
            fresh = self._reload()
            if set(fresh.keys) == set(self.keyring.keys):
                raise
            self.keyring = fresh
            return self.keyring.open(envelope, table=table, row_id=row_id, column=column)
