"""Pending logins: state, nonce and PKCE verifier, sealed, single-use, expiring.

A login is claimed by a compare-and-swap from `pending` to `exchanging`, so a redirect that
arrives twice (a reload, a replayed URL) exchanges its code at most once. A device login
(RFC 8628) has no state; its poller claims it by id, the same way, once the provider has
answered with tokens; the provider's device authorization answer is sealed in `device`.
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
CODE, DEVICE = "code", "device"  # the login's method: authorization code + PKCE, or RFC 8628
KEEP_FINISHED = timedelta(days=1)  # finished logins stay readable this long after expiry
EXPIRED = {
    CODE: "the login expired before it completed",
    DEVICE: "the code expired before anyone entered it: start a new login",
}


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
    code_verifier: str | None  # None for a device login, which has no PKCE
    force: bool
    method: str = CODE


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """What GET /v1/logins/{id} reports."""

    id: str
    provider: str
    user: str
    status: str
    error: str | None
    expires_at: datetime
    method: str = CODE


@dataclass(frozen=True, slots=True)
class PendingDevice:
    """A device login still waiting for its person: the sealed answer, opened."""

    id: str
    device: str  # the provider's device authorization answer, as the login service wrote it
    force: bool
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

    async def insert_device(
        self,
        *,
        login_id: str,
        provider: str,
        user: str,
        device: str,
        force: bool,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        """Record a new pending device login with its sealed device authorization answer."""
        async with self._writer.begin() as conn:
            await conn.execute(delete(logins).where(logins.c.expires_at < now - KEEP_FINISHED))
            await conn.execute(
                insert(logins).values(
                    id=login_id,
                    provider=provider,
                    user_name=user,
                    state_hash=None,
                    method=DEVICE,
                    device=self._sealer.seal(
                        device, table="logins", row_id=login_id, column="device"
                    ),
                    key_id=self._sealer.keyring.primary,
                    force=force,
                    status=PENDING,
                    created_at=now,
                    expires_at=expires_at,
                )
            )

    async def pending_device(self, provider: str, user: str, now: datetime) -> PendingDevice | None:
        """The device login for PROVIDER/USER still waiting for its person, if there is one."""
        query = (
            select(logins)
            .where(
                logins.c.provider == provider,
                logins.c.user_name == user,
                logins.c.method == DEVICE,
                logins.c.status == PENDING,
                logins.c.expires_at > now,
            )
            .order_by(logins.c.created_at.desc())
            .limit(1)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None or row.device is None:
            return None
        device = self._sealer.open(row.device, table="logins", row_id=row.id, column="device")
        return PendingDevice(
            id=row.id, device=device, force=bool(row.force), expires_at=row.expires_at
        )

    async def insist_on_force(self, login_id: str) -> None:
        """Let a pending login replace a grant held by another account when it completes."""
        async with self._writer.begin() as conn:
            await conn.execute(
                update(logins)
                .where(logins.c.id == login_id, logins.c.status == PENDING)
                .values(force=True)
            )

    async def claim_device(self, login_id: str, now: datetime) -> PendingLogin:
        """Take a pending device login for its completion, once; LoginError says why not."""
        async with self._writer.begin() as conn:
            result = await conn.execute(
                update(logins)
                .where(
                    logins.c.id == login_id,
                    logins.c.method == DEVICE,
                    logins.c.status == PENDING,
                    logins.c.expires_at > now,
                )
                .values(status=EXCHANGING)
            )
            row = (await conn.execute(select(logins).where(logins.c.id == login_id))).first()
        if row is None:
            raise LoginError("the login is gone from the store")
        if result.rowcount != 1:
            if row.status == PENDING:
                raise LoginError(EXPIRED[DEVICE])
            raise LoginError(f"the login already ended ({row.status})")
        return PendingLogin(
            id=row.id,
            provider=row.provider,
            user=row.user_name,
            nonce=None,
            code_verifier=None,
            force=bool(row.force),
            method=DEVICE,
        )

    async def fail_unfinished(self, login_id: str, reason: str, now: datetime) -> bool:
        """End a login that has not completed as failed; False when it had already ended."""
        async with self._writer.begin() as conn:
            result = await conn.execute(
                update(logins)
                .where(logins.c.id == login_id, logins.c.status.in_((PENDING, EXCHANGING)))
                .values(
                    status=FAILED,
                    error=reason,
                    finished_at=now,
                    nonce=None,
                    code_verifier=None,
                    device=None,
                )
            )
        return result.rowcount == 1

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
                .values(
                    status=status,
                    error=error,
                    finished_at=now,
                    nonce=None,
                    code_verifier=None,
                    device=None,
                )
            )

    async def get(self, login_id: str, now: datetime) -> LoginRecord | None:
        """A login's progress, or None; one left unfinished past its expiry reads as failed."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(logins).where(logins.c.id == login_id))).first()
        if row is None:
            return None
        status, error = row.status, row.error
        if status in (PENDING, EXCHANGING) and row.expires_at <= now:
            status, error = FAILED, EXPIRED.get(row.method, EXPIRED[CODE])
        return LoginRecord(
            id=row.id,
            provider=row.provider,
            user=row.user_name,
            status=PENDING if status == EXCHANGING else status,
            error=error,
            expires_at=row.expires_at,
            method=row.method,
        )
