"""Pending logins: state, nonce and PKCE verifier, sealed, single-use, expiring.

A login is claimed by a compare-and-swap from `pending` to `exchanging`, so a redirect that
arrives twice (a reload, a replayed URL) exchanges its code at most once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.errors import LoginError
from broker.store.engine import writer
from broker.store.sealing import Sealer
from broker.store.tables import logins

PENDING, EXCHANGING, COMPLETE, FAILED = "pending", "exchanging", "complete", "failed"
KEEP_FINISHED = timedelta(days=1)  # finished logins stay readable this long after expiry


def state_hash(state: str) -> str:
    """The lookup key of a login: the state itself is never stored."""
    return hashlib.sha256(state.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """A login claimed for its code exchange."""

    id: str
    provider: str
    user: str
    nonce: str | None
    code_verifier: str
    force: bool


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """What GET /v1/logins/{id} reports."""

    id: str
    provider: str
    user: str
    status: str
    error: str | None
    expires_at: datetime


class LoginRepository:
    """Stores logins; the only SQL about them."""

    def __init__(self, engine: AsyncEngine, sealer: Sealer) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self._sealer = sealer

    async def insert(
        self,
        *,
        login_id: str,
        provider: str,
        user: str,
        state: str,
        nonce: str | None,
        code_verifier: str,
        force: bool,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        """Record a new pending login; drop logins that expired a day ago."""

        def seal(column: str, value: str) -> bytes:
            return self._sealer.seal(value, table="logins", row_id=login_id, column=column)

        async with self._writer.begin() as conn:
            await conn.execute(delete(logins).where(logins.c.expires_at < now - KEEP_FINISHED))
            await conn.execute(
                insert(logins).values(
                    id=login_id,
                    provider=provider,
                    user_name=user,
                    state_hash=state_hash(state),
                    nonce=None if nonce is None else seal("nonce", nonce),
                    code_verifier=seal("code_verifier", code_verifier),
                    key_id=self._sealer.keyring.primary,
                    force=force,
                    status=PENDING,
                    created_at=now,
                    expires_at=expires_at,
                )
            )

    async def claim(self, state: str, now: datetime) -> PendingLogin:
        """Take the pending login for `state`, once; LoginError says why when it cannot be."""
        key = state_hash(state)
        async with self._writer.begin() as conn:
            result = await conn.execute(
                update(logins)
                .where(
                    logins.c.state_hash == key,
                    logins.c.status == PENDING,
                    logins.c.expires_at > now,
                )
                .values(status=EXCHANGING)
            )
            row = (await conn.execute(select(logins).where(logins.c.state_hash == key))).first()
            if row is not None and result.rowcount != 1 and row.status == PENDING:
                await conn.execute(
                    update(logins)
                    .where(logins.c.id == row.id)
                    .values(status=FAILED, error="the login expired", finished_at=now)
                )
        if row is None:
            raise LoginError("unknown login state: start a new login")
        if result.rowcount != 1:
            if row.status == PENDING:
                raise LoginError("the login expired: start a new one")
            raise LoginError("this login was already used: start a new one")

        def open_(column: str) -> str:
            return self._sealer.open(
                getattr(row, column), table="logins", row_id=row.id, column=column
            )

        return PendingLogin(
            id=row.id,
            provider=row.provider,
            user=row.user_name,
            nonce=None if row.nonce is None else open_("nonce"),
            code_verifier=open_("code_verifier"),
            force=bool(row.force),
        )

    async def finish(self, login_id: str, status: str, error: str | None, now: datetime) -> None:
        """Mark a claimed login complete or failed, and forget its secrets."""
        async with self._writer.begin() as conn:
            await conn.execute(
                update(logins)
                .where(logins.c.id == login_id)
                .values(status=status, error=error, finished_at=now, nonce=None, code_verifier=None)
            )

    async def get(self, login_id: str, now: datetime) -> LoginRecord | None:
        """A login's progress, or None; one left unfinished past its expiry reads as failed."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(logins).where(logins.c.id == login_id))).first()
        if row is None:
            return None
        status, error = row.status, row.error
        if status in (PENDING, EXCHANGING) and row.expires_at <= now:
            status, error = FAILED, "the login expired before it completed"
        return LoginRecord(
            id=row.id,
            provider=row.provider,
            user=row.user_name,
            status=PENDING if status == EXCHANGING else status,
            error=error,
            expires_at=row.expires_at,
        )
