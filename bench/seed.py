"""Filling a store with many grants quickly, and reading back how far their rotation got.

Grants go in through the store's own rows mapper (`GrantRows`: the same plain columns and the
same sealing as `GrantRepository.insert`), a thousand rows per transaction, each with a value of
the change sequence, so the daemon finds a store exactly as if they had been imported one by
one, in a fraction of the time.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, insert, select

from bench.tokens import fake_token
from broker.crypto import Keyring
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.engine import create_engine, writer
from broker.store.migrate import upgrade
from broker.store.rows import GrantRows
from broker.store.sealing import Sealer
from broker.store.session import take_versions
from broker.store.tables import grants

BATCH = 1000


@dataclass(frozen=True, slots=True)
class Lifetimes:
    """When the seeded access tokens expire and when each grant is next due, relative to now."""

    access_expires_in: timedelta
    next_refresh_in: timedelta

    @classmethod
    def long_lived(cls) -> Lifetimes:
        """Nothing due for hours: a daemon that only serves."""
        return cls(timedelta(hours=10), timedelta(hours=7))

    @classmethod
    def all_due(cls) -> Lifetimes:
        """Every access token already expired and every grant due: a rotation storm."""
        return cls(timedelta(minutes=-1), timedelta(minutes=-1))


def user_name(index: int) -> str:
    """The USER of the index-th seeded grant."""
    return f"user-{index:06d}"


def seed(
    store_url: str, keyring: Keyring, count: int, provider: str, lifetimes: Lifetimes
) -> list[str]:
    """Migrate the store and insert `count` active grants of `provider`; their users."""
    return asyncio.run(_seed(store_url, keyring, count, provider, lifetimes))


async def _seed(
    store_url: str, keyring: Keyring, count: int, provider: str, lifetimes: Lifetimes
) -> list[str]:
    engine = create_engine(store_url)
    rows = GrantRows(Sealer(keyring))
    users = [user_name(i) for i in range(count)]
    try:
        await upgrade(engine)
        for start in range(0, count, BATCH):
            now = datetime.now(UTC)
            batch = [
                _grant(provider, user, now, lifetimes) for user in users[start : start + BATCH]
            ]
            async with writer(engine).begin() as conn:
                last = await take_versions(conn, len(batch))
                values = [
                    {**rows.plain(g), **rows.sealed(g), "version": last - len(batch) + 1 + i}
                    for i, g in enumerate(batch)
                ]
                await conn.execute(insert(grants), values)
    finally:
        await engine.dispose()
    return users


def _grant(provider: str, user: str, now: datetime, lifetimes: Lifetimes) -> Grant:
    return Grant(
        id=uuid.uuid4().hex,
        provider=provider,
        user=user,
        state=GrantState.ACTIVE,
        generation=1,
        tokens=TokenSet(refresh_token=Secret(fake_token()), access_token=Secret(fake_token())),
        scopes=("profile",),
        access_issued_at=now - timedelta(minutes=2),
        access_expires_at=now + lifetimes.access_expires_in,
        next_refresh_at=now + lifetimes.next_refresh_in,
        created_at=now,
        updated_at=now,
    )


async def generations(store_url: str) -> dict[int, int]:
    """How many grants stand at each generation."""
    engine = create_engine(store_url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                select(grants.c.generation, func.count()).group_by(grants.c.generation)
            )
            return {int(generation): int(n) for generation, n in result.all()}
    finally:
        await engine.dispose()


async def count(store_url: str) -> int:
    """How many grants the store holds."""
    engine = create_engine(store_url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(grants))).scalar_one())
    finally:
        await engine.dispose()
