"""The grant repository: the only code that speaks SQL, and the only code that seals and opens.

Every change to a grant's tokens is a compare-and-swap on its generation: the UPDATE matches
`generation = expected` and sets `generation = expected + 1`, and a miss raises ConflictError.
Write transactions use the writer engine, which begins them IMMEDIATE on SQLite.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import delete, func, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.crypto import Keyring
from broker.errors import ConflictError
from broker.model import Grant, GrantState, GrantSummary
from broker.store.rotations import RotationWrites, notice
from broker.store.rows import GrantRows, verify_keys
from broker.store.sealing import Sealer, Stamp
from broker.store.session import Database, insert_rows, stamp_writes, take_versions
from broker.store.tables import UTCDateTime, grant_changes, grant_deletions, grants

_IN_BATCH = 500  # values in one SQL IN (...), well under every backend's parameter limit

# What an admin's view of a grant reads: every column but the sealed ones, and whether the
# sealed tokens are there. Nothing is decrypted, so the view costs no key and no AES.
_SUMMARY_COLUMNS = (
    grants.c.provider,
    grants.c.user_name,
    grants.c.sub,
    grants.c.state,
    grants.c.scopes,
    grants.c.access_expires_at,
    grants.c.next_refresh_at,
    grants.c.generation,
    grants.c.last_error,
    grants.c.refresh_token.is_not(None).label("has_refresh_token"),
    grants.c.access_token.is_not(None).label("has_access_token"),
)


@dataclass(frozen=True, slots=True)
class DueGrant:
    """A grant the schedule loop should refresh now."""

    id: str
    provider: str
    next_refresh_at: datetime


@dataclass(frozen=True, slots=True)
class Deletion:
    """A grant deleted at a version of the change sequence."""

    grant_id: str
    provider: str
    user: str
    version: int


@dataclass(frozen=True, slots=True)
class Changes:
    """What a follower of the change sequence has not seen yet, and where it now stands."""

    written: list[Grant]
    deleted: list[Deletion]
    version: int
    more: bool = False  # a page: more changes follow `version`


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """How many grants a key id seals (None: grants with nothing sealed)."""

    key_id: str | None
    grants: int


class GrantRepository(RotationWrites):
    """Loads and saves grants, sealing their secrets with the keyring on the way in; with the
    refresher's writes (broker.store.rotations)."""

    def __init__(
        self,
        engine: AsyncEngine,
        keyring: Keyring,
        reload_keyring: Callable[[], Keyring] | None = None,
        *,
        keyring_stamp: Callable[[], Stamp] | None = None,
        node_timeout: timedelta | None = None,
    ) -> None:
        self._db = Database(engine)
        self.node_timeout = node_timeout
        self.sealer = Sealer(keyring, reload_keyring, keyring_stamp)
        self._rows = GrantRows(self.sealer)

    @property
    def engine(self) -> AsyncEngine:
        """The engine this repository works on."""
        return self._db.engine

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
        async with self._db.read() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else self._rows.open(row)

    async def get_many(self, addresses: list[tuple[str, str]]) -> dict[tuple[str, str], Grant]:
        """The grants at these PROVIDER/USER addresses that exist, opened."""
        wanted = set(addresses)
        found: dict[tuple[str, str], Grant] = {}
        for provider in {p for p, _ in wanted}:
            users = [u for p, u in wanted if p == provider]
            for start in range(0, len(users), _IN_BATCH):
                query = select(grants).where(
                    grants.c.provider == provider,
                    grants.c.user_name.in_(users[start : start + _IN_BATCH]),
                )
                async with self._db.read() as conn:
                    rows = (await conn.execute(query)).all()
                for row in rows:
                    grant = self._rows.open(row)
                    found[(grant.provider, grant.user)] = grant
        return found

    async def summaries(
        self, now: datetime, provider: str | None = None, user: str | None = None
    ) -> list[GrantSummary]:
        """Admin views of every grant (or of PROVIDER/USER), ordered by provider and user, with
        the state callers see at `now`; read without opening a sealed value."""
        query = select(*_SUMMARY_COLUMNS).order_by(grants.c.provider, grants.c.user_name)
        if provider is not None and user is not None:
            query = query.where(grants.c.provider == provider, grants.c.user_name == user)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            GrantSummary.seen(
                GrantSummary(
                    provider=row.provider,
                    user=row.user_name,
                    sub=row.sub,
                    state=GrantState(row.state),
                    scopes=tuple(row.scopes.split()),
                    access_expires_at=row.access_expires_at,
                    next_refresh_at=row.next_refresh_at,
                    generation=row.generation,
                    last_error=row.last_error,
                    has_refresh_token=bool(row.has_refresh_token),
                ),
                has_access_token=bool(row.has_access_token),
                now=now,
            )
            for row in rows
        ]

    async def get_by_id(self, grant_id: str) -> Grant | None:
        """The grant with this row id, opened, or None."""
        async with self._db.read() as conn:
            row = (await conn.execute(select(grants).where(grants.c.id == grant_id))).first()
        return None if row is None else self._rows.open(row)

    async def all(self) -> list[Grant]:
        """Every grant, opened, ordered by provider and user."""
        query = select(grants).order_by(grants.c.provider, grants.c.user_name)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [self._rows.open(row) for row in rows]

    async def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        async with self._db.read() as conn:
            await conn.execute(select(1))

    # -- writes -----------------------------------------------------------------------------

    async def insert(self, grant: Grant, now: datetime) -> Grant:
        """Store a new grant at generation 1; the row id is chosen here."""
        grant = replace(grant, id=uuid.uuid4().hex, generation=1, created_at=now, updated_at=now)
        values = {**self._rows.plain(grant), **self._rows.sealed(grant)}
        values.pop("version")
        try:
            async with self._db.write() as conn:
                await conn.execute(insert(grants).values(**values))
                stamps = await stamp_writes(conn, self._db, [grant.id], now)
                version, updated_at = stamps[grant.id]
                await self._db.notify(conn, [notice(grant.id, version)])
        except IntegrityError:
            raise ConflictError(
                f"grant {grant.name} was created by someone else meanwhile"
            ) from None
        return replace(grant, key_id=values["key_id"], version=version, updated_at=updated_at)

    async def store_many(
        self, new: list[Grant], replacing: list[tuple[Grant, int]], now: datetime
    ) -> list[Grant]:
        """Insert `new` grants and write each of `replacing` over its row (if still at the
        expected generation) in one transaction; the stored grants, new ones first.

        ConflictError (and nothing written) when a new grant's address was taken or a replaced
        row changed meanwhile.
        """
        # Each grant as it is written: the grant, its row id, generation, creation and key id.
        written: list[tuple[Grant, str, int, datetime | None, str | None]] = []
        try:
            async with self._db.write() as conn:
                rows = []
                for grant in new:
                    row_id = uuid.uuid4().hex
                    values = {**self._rows.plain(grant), **self._rows.sealed(grant, row_id)}
                    values.update(id=row_id, generation=1, created_at=now, updated_at=now)
                    values.pop("version")
                    rows.append(values)
                    written.append((grant, row_id, 1, now, values["key_id"]))
                await insert_rows(conn, grants, rows)
                for grant, expected in replacing:
                    values = {**self._rows.plain(grant), **self._rows.sealed(grant)}
                    values.update(generation=expected + 1, updated_at=now)
                    for fixed in ("id", "created_at", "version"):
                        values.pop(fixed)
                    result = await conn.execute(
                        update(grants)
                        .where(grants.c.id == grant.id, grants.c.generation == expected)
                        .values(**values)
                    )
                    if result.rowcount != 1:
                        raise ConflictError(f"grant {grant.name} changed meanwhile")
                    written.append(
                        (grant, grant.id, expected + 1, grant.created_at, values["key_id"])
                    )
                stamps = await stamp_writes(conn, self._db, [w[1] for w in written], now)
                stored = [
                    replace(
                        grant,
                        id=row_id,
                        generation=generation,
                        created_at=created_at,
                        key_id=key_id,
                        version=stamps[row_id][0],
                        updated_at=stamps[row_id][1],
                    )
                    for grant, row_id, generation, created_at, key_id in written
                ]
                await self._db.notify(conn, [notice(g.id, g.version) for g in stored])
        except IntegrityError:
            raise ConflictError("a grant of this import was created by someone else") from None
        return stored

    async def replace_tokens(self, grant: Grant, expected_generation: int, now: datetime) -> Grant:
        """Write `grant` over its row if the row is still at `expected_generation`."""
        new = replace(grant, generation=expected_generation + 1, updated_at=now)
        values = {**self._rows.plain(new), **self._rows.sealed(new)}
        for fixed in ("id", "created_at", "version"):
            values.pop(fixed)
        async with self._db.write() as conn:
            result = await conn.execute(
                update(grants)
                .where(grants.c.id == grant.id, grants.c.generation == expected_generation)
                .values(**values)
            )
            if result.rowcount != 1:
                raise ConflictError(
                    f"grant {grant.name} changed under us "
                    f"(expected generation {expected_generation})"
                )
            version, updated_at = (await stamp_writes(conn, self._db, [grant.id], now))[grant.id]
            await self._db.notify(conn, [notice(grant.id, version)])
        return replace(new, key_id=values["key_id"], version=version, updated_at=updated_at)

    async def delete(self, grant_id: str, now: datetime) -> bool:
        """Delete a grant row, recording the deletion in the change sequence; True if it existed."""
        async with self._db.write() as conn:
            row = (
                await conn.execute(
                    select(grants.c.provider, grants.c.user_name).where(grants.c.id == grant_id)
                )
            ).first()
            if row is None:
                return False
            await conn.execute(delete(grants).where(grants.c.id == grant_id))
            version = await take_versions(conn)
            await conn.execute(
                insert(grant_deletions).values(
                    version=version,
                    grant_id=grant_id,
                    provider=row.provider,
                    user_name=row.user_name,
                    deleted_at=now,
                )
            )
            await self._db.notify(conn, [notice(grant_id, version, deleted=True)])
        return True

    # -- the schedule and the change sequence ---------------------------------------------

    async def due(self, now: datetime, limit: int, providers: Iterable[str]) -> list[DueGrant]:
        """Active grants of `providers` whose refresh time has come, with no live lease."""
        query = (
            select(grants.c.id, grants.c.provider, grants.c.next_refresh_at)
            .where(
                grants.c.state == GrantState.ACTIVE.value,
                grants.c.provider.in_(list(providers)),
                # A claim made an open intent due at once (see Rotations._take).
                grants.c.next_refresh_at <= self._db.now(now),
                self.lease_free_for(None, now),
            )
            .order_by(grants.c.next_refresh_at)
            .limit(limit)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [DueGrant(row.id, row.provider, row.next_refresh_at) for row in rows]

    async def next_due_at(self, now: datetime, providers: Iterable[str]) -> datetime | None:
        """The earliest refresh time among active, unleased grants of `providers`."""
        query = select(func.min(grants.c.next_refresh_at)).where(
            grants.c.state == GrantState.ACTIVE.value,
            grants.c.provider.in_(list(providers)),
            self.lease_free_for(None, now),
        )
        async with self._db.read() as conn:
            value: datetime | None = (await conn.execute(query)).scalar_one()
        return UTCDateTime().process_result_value(value, self._db.engine.dialect)

    async def changes_since(self, version: int, limit: int | None = None) -> Changes:
        """Writes and deletions with a version above `version` (by anyone), in version order.

        With `limit`, at most that many writes: the first page of them, with the deletions up
        to the last version it reaches; `Changes.more` says whether to ask again from there.
        """
        query = select(grants).where(grants.c.version > version).order_by(grants.c.version)
        if limit is not None:
            query = query.limit(limit)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
            more = limit is not None and len(rows) == limit
            gone_query = select(grant_deletions).where(grant_deletions.c.version > version)
            if more:
                gone_query = gone_query.where(grant_deletions.c.version <= rows[-1].version)
            gone = (await conn.execute(gone_query.order_by(grant_deletions.c.version))).all()
        written = [self._rows.open(row) for row in rows]
        deleted = [Deletion(row.grant_id, row.provider, row.user_name, row.version) for row in gone]
        last = max([version, *(g.version for g in written), *(d.version for d in deleted)])
        return Changes(written, deleted, last, more)

    async def last_version(self) -> int:
        """The change sequence's current value: everything up to it is committed."""
        async with self._db.read() as conn:
            value = (
                await conn.execute(select(grant_changes.c.seq).where(grant_changes.c.id == 1))
            ).scalar_one_or_none()
        return int(value or 0)

    # -- keys -------------------------------------------------------------------------------

    async def key_usage(self) -> list[KeyUsage]:
        """How many grants each key id seals."""
        query = select(grants.c.key_id, func.count()).group_by(grants.c.key_id)
        async with self._db.read() as conn:
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
        async with self._db.read() as conn:
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
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        moved = 0
        async with self._db.write() as conn:
            for row in rows:
                grant = self._rows.open(row)
                sealed = self._rows.sealed(grant)
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
        async with self._db.read() as conn:
            if not await conn.run_sync(lambda sync: inspect(sync).has_table("grants")):
                return []
            return await verify_keys(conn, self.keyring)
