"""Grants to rows and back: which columns are plain, which are sealed, and how to open them.

Sealed columns (see `GRANT_SEALED_COLUMNS`) hold AES-GCM envelopes whose associated data
binds the table, the row id and the column, so a value copied elsewhere does not open.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.crypto import Keyring
from broker.errors import DecryptError
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.sealing import Sealer
from broker.store.tables import GRANT_SEALED_COLUMNS, grants

_TOKEN_COLUMNS = ("refresh_token", "access_token", "id_token")
_NO_CLAIMS: dict[str, object] = {}  # shared by every grant without claims; never mutated
_INTERN_LIMIT = 4096  # distinct values held at most; past it they are forgotten and start again


class _Interned:
    """One copy of each value that many rows repeat (provider names, scope lists, token types,
    key ids), so 100,000 cached grants do not hold 100,000 copies of "Bearer"."""

    __slots__ = ("_scopes", "_strings")

    def __init__(self) -> None:
        self._strings: dict[str, str] = {}
        self._scopes: dict[str, tuple[str, ...]] = {}

    def string(self, value: str | None) -> str | None:
        if value is None:
            return None
        if len(self._strings) > _INTERN_LIMIT:  # values that do not repeat after all
            self._strings.clear()
        return self._strings.setdefault(value, value)

    def scopes(self, text: str) -> tuple[str, ...]:
        found = self._scopes.get(text)
        if found is None:
            if len(self._scopes) > _INTERN_LIMIT:
                self._scopes.clear()
            found = self._scopes[text] = tuple(self.string(s) or s for s in text.split())
        return found


class GrantRows:
    """Maps Grant values to the grants table's columns, sealing with the keyring."""

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer
        self._interned = _Interned()

    def plain(self, grant: Grant) -> dict[str, Any]:
        """The columns that are stored as they are."""
        return {
            "id": grant.id,
            "provider": grant.provider,
            "user_name": grant.user,
            "sub": grant.sub,
            "state": grant.state.value,
            "scopes": " ".join(grant.scopes),
            "token_type": grant.token_type,
            "access_expires_at": grant.access_expires_at,
            "next_refresh_at": grant.next_refresh_at,
            "generation": grant.generation,
            "last_error": grant.last_error,
            "created_at": grant.created_at,
            "updated_at": grant.updated_at,
            "access_issued_at": grant.access_issued_at,
            "refresh_failures": grant.refresh_failures,
            "intent_at": grant.intent_at,
            "version": grant.version,
        }

    def sealed(self, grant: Grant, row_id: str | None = None) -> dict[str, Any]:
        """The sealed columns, and the key id that sealed them (for the row `row_id`, by
        default the grant's own)."""
        row = grant.id if row_id is None else row_id

        def seal(column: str, value: str | None) -> bytes | None:
            if value is None:
                return None
            return self.sealer.seal(value, table="grants", row_id=row, column=column)

        tokens = grant.tokens
        values: dict[str, Any] = {
            name: seal(name, None if secret is None else secret.reveal())
            for name, secret in zip(
                _TOKEN_COLUMNS,
                (tokens.refresh_token, tokens.access_token, tokens.id_token),
                strict=True,
            )
        }
        values["claims"] = seal("claims", json.dumps(grant.claims)) if grant.claims else None
        sealed_any = any(values[name] is not None for name in GRANT_SEALED_COLUMNS)
        values["key_id"] = self.sealer.keyring.primary if sealed_any else None
        return values

    def open(self, row: Row[Any]) -> Grant:
        """A stored row as a Grant, its secrets opened."""
        m = row._mapping

        def open_(column: str) -> str | None:
            envelope = m[column]
            if envelope is None:
                return None
            return self.sealer.open(envelope, table="grants", row_id=m["id"], column=column)

        def secret(column: str) -> Secret | None:
            value = open_(column)
            return None if value is None else Secret(value)

        claims_text = open_("claims")
        interned = self._interned
        return Grant(
            id=m["id"],
            provider=interned.string(m["provider"]) or "",
            user=m["user_name"],
            sub=m["sub"],
            state=GrantState(m["state"]),
            generation=m["generation"],
            tokens=TokenSet(
                refresh_token=secret("refresh_token"),
                access_token=secret("access_token"),
                id_token=secret("id_token"),
            ),
            scopes=interned.scopes(m["scopes"]),
            token_type=interned.string(m["token_type"]) or "",
            access_expires_at=m["access_expires_at"],
            next_refresh_at=m["next_refresh_at"],
            last_error=m["last_error"],
            key_id=interned.string(m["key_id"]),
            claims=json.loads(claims_text) if claims_text else _NO_CLAIMS,
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            access_issued_at=m["access_issued_at"],
            refresh_failures=m["refresh_failures"],
            intent_at=m["intent_at"],
            version=m["version"],
        )


async def verify_keys(conn: AsyncConnection, keyring: Keyring) -> list[str]:
    """Open the first sealed value of one grant per key id; report each that fails."""
    sealed = [grants.c[name] for name in GRANT_SEALED_COLUMNS]
    query = select(grants.c.key_id).where(grants.c.key_id.is_not(None)).distinct()
    problems: list[str] = []
    for key_id in (await conn.execute(query)).scalars().all():
        sample = select(grants.c.id, *sealed).where(grants.c.key_id == key_id).limit(1)
        row = (await conn.execute(sample)).first()
        if row is None:
            continue
        values = row._mapping
        column = next(name for name in GRANT_SEALED_COLUMNS if values[name] is not None)
        try:
            keyring.open(values[column], table="grants", row_id=values["id"], column=column)
        except DecryptError as exc:
            problems.append(str(exc))
    return problems
