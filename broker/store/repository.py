"""The grant repository: the only code that speaks SQL, and the only code that seals and opens.

Every change to a grant's tokens is a compare-and-swap on its generation: the UPDATE matches
`generation = expected` and sets `generation = expected + 1`, and a miss raises ConflictError.
Write transactions use the writer engine, which begins them IMMEDIATE on SQLite.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, func, insert, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.crypto import Keyring
from broker.errors import ConflictError, DecryptError
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.engine import writer
from broker.store.sealing import Sealer
from broker.store.tables import GRANT_SEALED_COLUMNS, grants

_TOKEN_COLUMNS = ("refresh_token", "access_token", "id_token")


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """How many grants a key id seals (None: grants with nothing sealed)."""

    key_id: str | None
    grants: int


class GrantRepository:
    """Loads and saves grants, sealing their secrets with the keyring on the way in."""

    def __init__(
        self,
        engine: AsyncEngine,
        keyring: Keyring,
        reload_keyring: Callable[[], Keyring] | None = None,
    ) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self.sealer = Sealer(keyring, reload_keyring)

    @property
    def keyring(self) -> Keyring:
        """The keyring in use (re-read when a sealed value names a key it lacks)."""
        return self.sealer.keyring

    @keyring.setter
    def keyring(self, keyring: Keyring) -> None:
        self.sealer.keyring = keyring

    # -- reads ------------------------------------------------------------------------------

    async def get(self, provider: str, user: str) -> Grant | None:
        """The grant at PROVIDER/USER, opened, or None."""
        query = select(grants).where(grants.c.provider == provider, grants.c.user_name == user)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else self._open(row)

    async def get_by_id(self, grant_id: str) -> Grant | None:
        """The grant with this row id, opened, or None."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(grants).where(grants.c.id == grant_id))).first()
        return None if row is None else self._open(row)

    async def all(self) -> list[Grant]:
        """Every grant, opened, ordered by provider and user."""
        query = select(grants).order_by(grants.c.provider, grants.c.user_name)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [self._open(row) for row in rows]

    async def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        async with self._engine.connect() as conn:
            await conn.execute(select(1))

    # -- writes -----------------------------------------------------------------------------

    async def insert(self, grant: Grant, now: datetime) -> Grant:
        """Store a new grant at generation 1; the row id is chosen here."""
        grant = replace(grant, id=uuid.uuid4().hex, generation=1, created_at=now, updated_at=now)
        values = {**self._plain_values(grant), **self._sealed_values(grant)}
        async with self._writer.begin() as conn:
            await conn.execute(insert(grants).values(**values))
        return replace(grant, key_id=values["key_id"])

    async def replace_tokens(self, grant: Grant, expected_generation: int, now: datetime) -> Grant:
        """Write `grant` over its row if the row is still at `expected_generation`."""
        new = replace(grant, generation=expected_generation + 1, updated_at=now)
        values = {**self._plain_values(new), **self._sealed_values(new)}
        for fixed in ("id", "created_at"):
            values.pop(fixed)
        query = (
            update(grants)
            .where(grants.c.id == grant.id, grants.c.generation == expected_generation)
            .values(**values)
        )
        async with self._writer.begin() as conn:
            result = await conn.execute(query)
        if result.rowcount != 1:
            raise ConflictError(
                f"grant {grant.name} changed under us (expected generation {expected_generation})"
            )
        return replace(new, key_id=values["key_id"])

    async def delete(self, grant_id: str) -> bool:
        """Delete a grant row; True when it existed."""
        async with self._writer.begin() as conn:
            result = await conn.execute(delete(grants).where(grants.c.id == grant_id))
        return result.rowcount == 1

    # -- keys -------------------------------------------------------------------------------

    async def key_usage(self) -> list[KeyUsage]:
        """How many grants each key id seals."""
        query = select(grants.c.key_id, func.count()).group_by(grants.c.key_id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return sorted(
            (KeyUsage(key_id, count) for key_id, count in rows),
            key=lambda usage: (usage.key_id is None, usage.key_id or ""),
        )

    async def count_not_under(self, key_id: str) -> int:
        """How many grants still hold values sealed with a key other than `key_id`."""
        query = (
            select(func.count())
            .select_from(grants)
            .where(grants.c.key_id.is_not(None), grants.c.key_id != key_id)
        )
        async with self._engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def reseal_batch(self, limit: int) -> int:
        """Re-encrypt up to `limit` grants not sealed with the primary key; how many moved.

        Each row is rewritten by a compare-and-swap on its generation without changing it, so
        a concurrent token update wins and the row is simply picked up by a later batch.
        """
        primary = self.keyring.primary
        query = (
            select(grants)
            .where(grants.c.key_id.is_not(None), grants.c.key_id != primary)
            .order_by(grants.c.id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        moved = 0
        async with self._writer.begin() as conn:
            for row in rows:
                grant = self._open(row)
                sealed = self._sealed_values(grant)
                result = await conn.execute(
                    update(grants)
                    .where(grants.c.id == grant.id, grants.c.generation == grant.generation)
                    .values(**sealed)
                )
                moved += result.rowcount
        return moved

    async def verify_keys(self) -> list[str]:
        """Problems opening one sealed value per key id in use; empty when the keyring fits.

        Reads only; used before migrations so a wrong keyring changes nothing on disk.
        """
        async with self._engine.connect() as conn:
            if not await conn.run_sync(lambda sync: inspect(sync).has_table("grants")):
                return []
            return await _verify_keys(conn, self.keyring)

    # -- mapping ----------------------------------------------------------------------------

    def _plain_values(self, grant: Grant) -> dict[str, Any]:
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
        }

    def _sealed_values(self, grant: Grant) -> dict[str, Any]:
        def seal(column: str, value: str | None) -> bytes | None:
            if value is None:
                return None
            return self.sealer.seal(value, table="grants", row_id=grant.id, column=column)

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
        values["key_id"] = self.keyring.primary if sealed_any else None
        return values

    def _open(self, row: Row[Any]) -> Grant:
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
        return Grant(
            id=m["id"],
            provider=m["provider"],
            user=m["user_name"],
            sub=m["sub"],
            state=GrantState(m["state"]),
            generation=m["generation"],
            tokens=TokenSet(
                refresh_token=secret("refresh_token"),
                access_token=secret("access_token"),
                id_token=secret("id_token"),
            ),
            scopes=tuple(m["scopes"].split()),
            token_type=m["token_type"],
            access_expires_at=m["access_expires_at"],
            next_refresh_at=m["next_refresh_at"],
            last_error=m["last_error"],
            key_id=m["key_id"],
            claims=json.loads(claims_text) if claims_text else {},
            created_at=m["created_at"],
            updated_at=m["updated_at"],
        )


async def _verify_keys(conn: AsyncConnection, keyring: Keyring) -> list[str]:
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
