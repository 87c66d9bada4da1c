"""The refresher's SQL: leases, intents, and the compare-and-swap writes of a refresh's outcome.

A refresh owns its grant through a lease. `claim` takes it by compare-and-swap, only when no
live lease of another owner exists and the row is still the version the caller holds, and in
the same write records the intent to send: a claim is the announcement (to other brokers too,
through the change sequence and NOTIFY) that a refresh token is about to leave. The outcome is
stored by `commit_refresh` (new tokens, fenced by the generation) or `settle` (no new tokens,
fenced by the generation and the lease). Each carries a write id, so a retry after a failure
whose fate is unknown can tell that its own write landed (`written_by`).

A lease is live while it has not expired and its owner is not dead: a node that is marked
stopped, or (with `node_timeout` set) whose heartbeat is older than that, holds nothing. Lease
times, intents and stamps come from the store's clock (`Database.now`). At most
`capacity` leases of one provider are live at once across every broker on the store: claims of a
provider are serialized (a transaction-scoped advisory lock on PostgreSQL; SQLite serializes
every write) and count the live leases first.
"""

from __future__ import annotations

import enum
import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Row,
    Select,
    Update,
    bindparam,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.errors import ConflictError, DecryptError, StoreUnavailable
from broker.model import Grant, GrantState, grant_name
from broker.store.group import GroupCommit
from broker.store.rows import GrantRows
from broker.store.session import (
    Database,
    clock_now,
    clock_shifted,
    stamp_writes,
    take_versions,
)
from broker.store.tables import Unindexed, grants, nodes

log = structlog.get_logger("broker.store.rotations")


class ClaimOutcome(enum.StrEnum):
    """Why a claim did or did not take the lease."""

    CLAIMED = "claimed"
    CHANGED = "changed"  # the row is no longer the version the caller holds (or is gone)
    HELD = "held"  # another owner holds a live lease
    FULL = "full"  # the provider has `capacity` refreshes in flight already


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim did: the claimed grant when it did, and whose lease it took over."""

    outcome: ClaimOutcome
    grant: Grant | None = None
    took_over: str | None = None  # the dead owner whose lease it replaced
    recovering: bool = False  # an intent was open already: an earlier outcome is unknown


@dataclass(frozen=True, slots=True)
class ClaimBatch:
    """Grants claimed at once, which the provider's capacity let this broker try, and which
    of those were left unclaimed because their sealed values do not open."""

    claims: list[Claim]
    tried: frozenset[str]
    unreadable: frozenset[str] = frozenset()


# Grants a claim's log line names when their rows do not open (the count says how many).
UNREADABLE_NAMED = 5

# Refresh outcomes committed in one transaction at most (broker.store.group).
COMMIT_BATCH = 256

# The write of one successful refresh, built once: fenced by the row's id and the generation the
# refresh started from; the SET clause is the columns named by the parameters it runs with.
_COMMIT = update(grants).where(
    grants.c.id == bindparam("fence_id"), grants.c.generation == bindparam("fence_generation")
)
# Each row's generation, read before a commit batch is written (the PostgreSQL form locks them).
_FENCES = select(grants.c.id, grants.c.generation).where(
    grants.c.id.in_(bindparam("fence_ids", expanding=True))
)
_FENCES_LOCKED = _FENCES.with_for_update(of=grants)


@dataclass(frozen=True, slots=True)
class _Commit:
    grant: Grant
    expected_generation: int
    write_id: str
    now: datetime


def notice(grant_id: str, version: int, deleted: bool = False) -> str:
    """The NOTIFY payload announcing a write: a grant and a version, never a token."""
    return f"{grant_id} {version}{' deleted' if deleted else ''}"


class RotationWrites:
    """The refresher's reads and writes; mixed into GrantRepository, which provides the rest."""

    _db: Database
    _rows: GrantRows
    # A node whose heartbeat is older than this is dead; None: only stopped nodes are.
    node_timeout: timedelta | None = None
    # Whether this broker may judge other nodes by time (a lapsed lease, a stale heartbeat):
    # only after it has itself reached the store without a break for a node_timeout. After an
    # outage of the store every heartbeat is stale and every lease may have lapsed; judged at
    # once, live brokers would take over each other's refreshes in flight (set by the fleet).
    judging: Callable[[], bool] = staticmethod(lambda: True)

    # -- liveness ------------------------------------------------------------------------------

    def lease_free_for(self, owner: str | None, now: datetime) -> ColumnElement[bool]:
        """Whether `owner` (None: anyone) may take a grant's lease now: nobody holds it, its
        owner is dead (stopped, or silent past node_timeout), it has expired, or `owner` holds
        it already. Time-based judgements wait until `judging()` allows them."""
        judging = self.judging()
        dead_before = (
            self._db.shifted(now, -self.node_timeout)
            if self.node_timeout is not None and judging
            else None
        )
        return _lease_free(owner, self._db.now(now), dead_before, judging=judging)

    def _claim_terms(
        self, provider: str, owner: str, now: datetime, lease: timedelta
    ) -> tuple[_ClaimSql, dict[str, Any]]:
        """A claim's statements, built once for this store and judgement, and the values of
        their parameters."""
        judging = self.judging()
        timed = self.node_timeout is not None and judging
        shifts = {_LEASE_UNTIL: lease}
        if timed:
            assert self.node_timeout is not None
            shifts[_DEAD_BEFORE] = -self.node_timeout
        values = {
            _PROVIDER: provider,
            _OWNER: owner,
            **self._db.clock_values(now, **shifts),
        }
        return _claim_sql(self._db.server_clock, judging=judging, timed=timed), values

    async def _room(
        self,
        conn: AsyncConnection,
        sql: _ClaimSql,
        values: dict[str, Any],
        provider: str,
        capacity: int,
    ) -> int:
        """How many more refreshes of `provider` may start now, fleet-wide; serializes the
        provider's claims until the transaction ends."""
        if self._db.server_clock:
            key = zlib.crc32(f"token-broker claims {provider}".encode())
            await conn.execute(_CLAIMS_LOCK, {"lock_key": key})
        live = (await conn.execute(sql.live, values)).scalar_one()
        return max(0, capacity - int(live))

    # -- claims --------------------------------------------------------------------------------

    async def claim(
        self,
        grant: Grant,
        owner: str,
        now: datetime,
        lease: timedelta,
        *,
        capacity: int | None = None,
    ) -> Claim:
        """Take the lease on `grant` and record the intent to send its refresh token.

        Only while the row is still the version `grant` was read at (so the refresh token about
        to be sent is the stored one), is active, has no live lease of another owner, and (with
        `capacity`) fewer than `capacity` refreshes of its provider are in flight. An intent
        left by an earlier owner (a refresh whose outcome is unknown) is kept, not renewed: the
        provider's grace is counted from it.
        """
        sql, values = self._claim_terms(grant.provider, owner, now, lease)
        async with self._db.write() as conn:
            current = (
                await conn.execute(
                    _locked(
                        self._db,
                        select(
                            grants.c.version,
                            grants.c.state,
                            grants.c.lease_owner,
                            grants.c.intent_at,
                            self.lease_free_for(owner, now).label("free"),
                        ).where(grants.c.id == grant.id),
                    )
                )
            ).first()
            if current is None or current.version != grant.version:
                return Claim(ClaimOutcome.CHANGED)
            if current.state != GrantState.ACTIVE.value or not current.free:
                return Claim(ClaimOutcome.HELD)
            if (
                capacity is not None
                and current.lease_owner != owner
                and await self._room(conn, sql, values, grant.provider, capacity) < 1
            ):
                return Claim(ClaimOutcome.FULL)
            (claimed,) = await self._take_many(conn, [grant], values)
        took_over = current.lease_owner if current.lease_owner not in (None, owner) else None
        return Claim(ClaimOutcome.CLAIMED, claimed, took_over, current.intent_at is not None)

    async def claim_due(
        self,
        provider: str,
        owner: str,
        now: datetime,
        lease: timedelta,
        *,
        capacity: int,
        limit: int,
        skip: frozenset[str] = frozenset(),
    ) -> list[Claim]:
        """Claim up to `limit` of `provider`'s due grants at once, within its fleet-wide
        capacity; rows another broker is claiming at this moment are skipped, not waited for.

        Due: the refresh time has come, or an intent is open (an unknown outcome to recover).
        The grants are read from the store, so the tokens sent are the stored ones.
        """
        batch = await self._claim_where(
            provider,
            owner,
            now,
            lease,
            capacity=capacity,
            limit=limit,
            where=grants.c.id.not_in(list(skip)) if skip else None,
        )
        return batch.claims

    async def claim_ids(
        self,
        provider: str,
        owner: str,
        now: datetime,
        lease: timedelta,
        *,
        capacity: int,
        ids: list[str],
    ) -> ClaimBatch:
        """Claim those of these grants (of `provider`, due by this broker's agenda) that are
        due and free, in the order given, within the provider's fleet-wide capacity; which
        could be tried."""
        return await self._claim_where(
            provider,
            owner,
            now,
            lease,
            capacity=capacity,
            limit=len(ids),
            order=ids,
        )

    async def _claim_where(
        self,
        provider: str,
        owner: str,
        now: datetime,
        lease: timedelta,
        *,
        capacity: int,
        limit: int,
        where: ColumnElement[bool] | None = None,
        order: list[str] | None = None,
    ) -> ClaimBatch:
        """Claim `order` (these ids, in this order), or else the earliest due of those
        `where` allows, up to `limit` and the provider's room."""
        sql, values = self._claim_terms(provider, owner, now, lease)
        async with self._db.write() as conn:
            room = min(limit, await self._room(conn, sql, values, provider, capacity))
            if room < 1:
                return ClaimBatch([], frozenset())
            if order is None:
                # Built per call (the schedule claims by ids): the earliest due, in order.
                query = sql.due.order_by(grants.c.next_refresh_at).limit(room)
                if where is not None:
                    query = query.where(where)
                rows = (
                    await conn.execute(_locked(self._db, query, skip_locked=True), values)
                ).all()
            else:  # the caller's own choice and order, within the room
                order = order[:room]
                rows = (await conn.execute(sql.by_ids, {**values, _IDS: order})).all()
                position = {grant_id: i for i, grant_id in enumerate(order)}
                rows = sorted(rows, key=lambda row: position[row.id])
            tried = frozenset(order if order is not None else (row.id for row in rows))
            opened, unreadable = self._opened(rows)
            taken = (
                await self._take_many(conn, [grant for _, grant in opened], values)
                if opened
                else []
            )
            claims = [
                Claim(
                    ClaimOutcome.CLAIMED,
                    claimed,
                    row.lease_owner if row.lease_owner not in (None, owner) else None,
                    row.intent_at is not None,
                )
                for (row, _), claimed in zip(opened, taken, strict=True)
            ]
        return ClaimBatch(claims, tried, unreadable)

    def _opened(
        self, rows: Sequence[Row[Any]]
    ) -> tuple[list[tuple[Row[Any], Grant]], frozenset[str]]:
        """The rows that open, as grants, and the ids of those that do not: left unclaimed
        (nothing is sent for them), so they cannot hold up the others of their batch. One log
        line per batch names them."""
        opened = []
        unreadable: list[tuple[str, str]] = []  # (row id, grant)
        reason = ""
        for row in rows:
            try:
                opened.append((row, self._rows.open(row)))
            except DecryptError as exc:
                unreadable.append((row.id, grant_name(row.provider, row.user_name)))
                reason = reason or str(exc)
        if unreadable:
            log.error(
                "grants_unreadable",
                count=len(unreadable),
                grants=[name for _, name in unreadable[:UNREADABLE_NAMED]],
                reason=reason,
                detail="their refreshes wait until their sealed values open: restart the daemon "
                "after keys rotate (when it reads a copy of the keyring), or restore the rows",
            )
        return opened, frozenset(row_id for row_id, _ in unreadable)

    async def _take_many(
        self, conn: AsyncConnection, claimed: list[Grant], values: dict[str, Any]
    ) -> list[Grant]:
        """Take the lease on each of `claimed` and record its intent: one statement for all,
        each row at a version of its own (`values` from `_claim_terms`)."""
        count = len(claimed)
        first = await take_versions(conn, count) - count + 1
        versions = {grant.id: first + i for i, grant in enumerate(claimed)}
        params = dict(values)
        for i, grant in enumerate(claimed):
            params[f"{_TAKE_ID}{i}"] = grant.id
            params[f"{_TAKE_VERSION}{i}"] = versions[grant.id]
        result = await conn.execute(_take_sql(self._db.server_clock, count), params)
        stamps = {row.id: row for row in result}
        await self._db.notify(conn, [notice(grant_id, v) for grant_id, v in versions.items()])
        return [
            replace(
                grant,
                intent_at=stamps[grant.id].intent_at,
                updated_at=stamps[grant.id].updated_at,
                version=versions[grant.id],
            )
            for grant in claimed
        ]

    async def take_lease(self, grant_id: str, owner: str, now: datetime, lease: timedelta) -> bool:
        """Take the lease on a grant without any intent (to change it outside a refresh, such
        as revoking it); False when another owner holds a live one."""
        async with self._db.write() as conn:
            result = await conn.execute(
                update(grants)
                .where(grants.c.id == grant_id, self.lease_free_for(owner, now))
                .values(lease_owner=owner, lease_expires_at=self._db.shifted(now, lease))
            )
        return bool(result.rowcount == 1)

    async def extend_lease(
        self, grant_id: str, owner: str, now: datetime, lease: timedelta
    ) -> bool:
        """Move this owner's lease deadline `lease` ahead; False when it no longer holds it."""
        return await self.renew_leases(owner, [grant_id], now, lease) == 1

    async def renew_leases(
        self, owner: str, grant_ids: list[str], now: datetime, lease: timedelta
    ) -> int:
        """Move the deadline of each of these leases `owner` holds `lease` ahead; how many."""
        if not grant_ids:
            return 0
        async with self._db.write() as conn:
            result = await conn.execute(
                update(grants)
                .where(grants.c.id.in_(grant_ids), grants.c.lease_owner == owner)
                .values(lease_expires_at=self._db.shifted(now, lease))
            )
        return int(result.rowcount)

    async def release(self, grant_id: str, owner: str) -> None:
        """Give up a lease without changing anything else (an intent stays for recovery)."""
        async with self._db.write() as conn:
            await conn.execute(
                update(grants)
                .where(grants.c.id == grant_id, grants.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    async def recoverable(self, now: datetime, limit: int) -> list[str]:
        """Grants whose refresh outcome is unknown and whose owner is gone (dead, or its lease
        expired): the ones a live broker should recover now."""
        query = (
            select(grants.c.id)
            .where(
                grants.c.lease_owner.is_not(None),
                grants.c.intent_at.is_not(None),
                grants.c.state == GrantState.ACTIVE.value,
                self.lease_free_for(None, now),
            )
            .limit(limit)
        )
        async with self._db.read() as conn:
            return list((await conn.execute(query)).scalars().all())

    async def lease_owners(self) -> set[str]:
        """Everyone holding a lease right now (live or not)."""
        query = select(grants.c.lease_owner).where(grants.c.lease_owner.is_not(None)).distinct()
        async with self._db.read() as conn:
            return {str(owner) for owner in (await conn.execute(query)).scalars().all()}

    async def lease_held(self, grant_id: str, now: datetime) -> bool:
        """Whether someone holds a live lease on this grant."""
        query = select(grants.c.id).where(
            grants.c.id == grant_id,
            grants.c.lease_owner.is_not(None),
            ~self.lease_free_for(None, now),
        )
        async with self._db.read() as conn:
            return (await conn.execute(query)).first() is not None

    # -- outcomes ------------------------------------------------------------------------------

    async def commit_refresh(
        self, grant: Grant, expected_generation: int, write_id: str, now: datetime
    ) -> Grant:
        """Store a successful refresh: new tokens, generation + 1, intent and lease cleared.

        Fenced by the generation alone: new tokens from the provider are the truth about the
        grant, so they land even over a lease another owner took meanwhile, unless someone
        stored a newer generation (then ConflictError). Refreshes ending together are
        committed together (broker.store.group); this returns once this one's transaction has
        committed.
        """
        return await self._commits.submit(_Commit(grant, expected_generation, write_id, now))

    @functools.cached_property
    def _commits(self) -> GroupCommit[_Commit, Grant]:
        return GroupCommit(
            self._commit_many,
            limit=COMMIT_BATCH,
            name="commit refreshes",
            ready=self._db.writer_free,
        )

    async def _commit_many(self, commits: Sequence[_Commit]) -> list[Grant | Exception]:
        # Sealed before the transaction, and versions taken last: the change sequence's lock
        # is held only from its stamp to the commit.
        prepared = []
        for commit in commits:
            new = replace(commit.grant, generation=commit.expected_generation + 1, intent_at=None)
            values = {**self._rows.plain(new), **self._rows.sealed(new)}
            for fixed in ("id", "created_at", "version", "updated_at"):
                values.pop(fixed)
            values.update(
                lease_owner=None,
                lease_expires_at=None,
                last_write=commit.write_id,
                fence_id=commit.grant.id,
                fence_generation=commit.expected_generation,
            )
            prepared.append((commit, new, values))
        async with self._db.write() as conn:
            landed = await _update_fenced(conn, self._db, [v for _, _, v in prepared])
            ids = [commit.grant.id for commit in commits if commit.write_id in landed]
            # Stamped (version and updated_at) last, by the store's clock of that moment.
            stamps = await stamp_writes(conn, self._db, ids, max(c.now for c in commits))
            await self._db.notify(conn, [notice(i, stamps[i][0]) for i in ids])
        return [
            replace(
                new,
                key_id=values["key_id"],
                version=stamps[commit.grant.id][0],
                updated_at=stamps[commit.grant.id][1],
            )
            if commit.write_id in landed
            else ConflictError(
                f"grant {commit.grant.name} is no longer at generation {commit.expected_generation}"
            )
            for commit, new, values in prepared
        ]

    async def settle(
        self,
        grant: Grant,
        owner: str,
        now: datetime,
        *,
        state: GrantState,
        last_error: str | None,
        next_refresh_at: datetime | None,
        refresh_failures: int,
        write_id: str,
        keep_intent: bool = False,
    ) -> Grant:
        """Store a refresh that produced no tokens; the tokens themselves stay untouched.

        `keep_intent` leaves the intent in place: the outcome is still unknown, and whoever
        claims the grant next carries on recovering it. Fenced by the generation and the lease.
        """
        intent = grant.intent_at if keep_intent else None
        changes: dict[str, Any] = {
            "state": state.value,
            "last_error": last_error,
            "next_refresh_at": next_refresh_at,
            "refresh_failures": refresh_failures,
            "intent_at": intent,
            "lease_owner": None,
            "lease_expires_at": None,
            "last_write": write_id,
        }
        async with self._db.write() as conn:
            result = await conn.execute(
                update(grants)
                .where(
                    grants.c.id == grant.id,
                    grants.c.generation == grant.generation,
                    grants.c.lease_owner == owner,
                )
                .values(**changes)
            )
            if result.rowcount != 1:
                raise ConflictError(
                    f"grant {grant.name} is no longer at generation {grant.generation} "
                    "under this lease"
                )
            version, updated_at = (await stamp_writes(conn, self._db, [grant.id], now))[grant.id]
            await self._db.notify(conn, [notice(grant.id, version)])
        return replace(
            grant,
            state=state,
            last_error=last_error,
            next_refresh_at=next_refresh_at,
            refresh_failures=refresh_failures,
            intent_at=intent,
            updated_at=updated_at,
            version=version,
        )

    async def written_by(self, grant_id: str, write_id: str) -> Grant | None:
        """The grant as stored if its last write is the one with `write_id`, else None."""
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    select(grants).where(grants.c.id == grant_id, grants.c.last_write == write_id)
                )
            ).first()
        return None if row is None else self._rows.open(row)

    async def changed_elsewhere(self, grant_id: str, generation: int, now: datetime) -> bool:
        """Whether the row moved past `generation`, or an owner with a live lease has sent
        (or is about to send) its refresh token; a missing row counts as changed."""
        query = select(
            grants.c.generation,
            grants.c.intent_at,
            grants.c.lease_owner.is_not(None) & ~self.lease_free_for(None, now),
        ).where(grants.c.id == grant_id)
        async with self._db.read() as conn:
            row = (await conn.execute(query)).first()
        if row is None or row[0] != generation:
            return True
        return bool(row[2]) and row[1] is not None


def _locked(db: Database, query: Select[Any], *, skip_locked: bool = False) -> Select[Any]:
    """`query` locking the rows it reads until the transaction ends (PostgreSQL; SQLite's
    write transactions hold the whole database already)."""
    if not db.server_clock:
        return query
    return query.with_for_update(skip_locked=skip_locked, of=grants)


async def _update_fenced(
    conn: AsyncConnection, db: Database, rows: list[dict[str, Any]]
) -> set[str]:
    """Run the fenced commit UPDATE for each of these rows; the write ids that landed.

    One executemany for the batch, not a statement per row (each one a round of the driver
    and of SQLAlchemy's execution). Which fences hold is read first, in the same transaction
    with the rows locked (SQLite's write transaction holds the whole store), so a write lands
    exactly when its own fence holds, as one UPDATE per row would say: a row whose
    `last_write` is this write's id from an earlier attempt that landed after all does not
    count (the caller finds that one by its write id). A grant twice in one batch (never the
    case under a lease) goes one row at a time, each fenced by the write before it.
    """
    if len({row["fence_id"] for row in rows}) < len(rows):
        return {
            row["last_write"] for row in rows if (await conn.execute(_COMMIT, row)).rowcount == 1
        }
    fences = _FENCES_LOCKED if db.server_clock else _FENCES
    current = dict(
        (await conn.execute(fences, {"fence_ids": [row["fence_id"] for row in rows]})).all()
    )
    held = [row for row in rows if current.get(row["fence_id"]) == row["fence_generation"]]
    if held:
        result = await conn.execute(_COMMIT, held)
        if conn.dialect.supports_sane_multi_rowcount and result.rowcount != len(held):
            # Cannot happen while the rows are locked; if it does, nothing is assumed: the
            # transaction rolls back and each write is tried again.
            raise StoreUnavailable("the commit batch changed other rows than its fences held")
    return {row["last_write"] for row in held}


# Parameters of the claim statements, which are built once (`_claim_sql`, `_take_sql`): a claim
# batch runs on every wake of the schedule during a backlog, and building its statements anew
# and computing their cache keys cost SQLAlchemy more than running them.
_PROVIDER, _OWNER, _IDS = "claim_provider", "claim_owner", "claim_ids"
_LEASE_UNTIL, _DEAD_BEFORE = "lease_until", "dead_before"
_TAKE_ID, _TAKE_VERSION = "take_id_", "take_version_"

_CLAIMS_LOCK = select(func.pg_advisory_xact_lock(bindparam("lock_key", type_=BigInteger)))


def _lease_free(
    owner: str | ColumnElement[str] | None,
    now: ColumnElement[datetime],
    dead_before: ColumnElement[datetime] | None,
    *,
    judging: bool,
) -> ColumnElement[bool]:
    """See `RotationWrites.lease_free_for`; `dead_before`: a heartbeat older than this is a
    dead node's (None: only stopped nodes are dead)."""
    dead: list[ColumnElement[bool]] = [nodes.c.stopped_at.is_not(None)]
    if dead_before is not None:
        dead.append(nodes.c.heartbeat_at < dead_before)
    free: list[ColumnElement[bool]] = [
        grants.c.lease_owner.is_(None),
        grants.c.lease_owner.in_(select(nodes.c.id).where(or_(*dead))),
    ]
    if judging:
        free.append(grants.c.lease_expires_at < now)
    if owner is not None:
        free.append(grants.c.lease_owner == owner)
    return or_(*free)


@dataclass(frozen=True, slots=True)
class _ClaimSql:
    """A claim's statements, for one kind of store and judgement."""

    live: Select[Any]  # how many leases of the provider are live now
    due: Select[Any]  # the provider's grants that are due and free for the owner
    by_ids: Select[Any]  # those of them among the given ids, locked


@functools.cache
def _claim_sql(server_clock: bool, *, judging: bool, timed: bool) -> _ClaimSql:
    now = clock_now(server_clock)
    dead_before = clock_shifted(server_clock, _DEAD_BEFORE) if timed else None
    # Not by the provider's index: the count walks the lease_owner index over the leased rows
    # only (an owner is a node id, never empty), and a batch's ids are looked up by primary
    # key; a backlog has thousands of grants of one provider, and this runs for every batch.
    provider = Unindexed(grants.c.provider) == bindparam(_PROVIDER)
    live = (
        select(func.count())
        .select_from(grants)
        .where(
            provider,
            grants.c.lease_owner > "",
            ~_lease_free(None, now, dead_before, judging=judging),
        )
    )
    due = select(grants).where(
        provider,
        grants.c.state == GrantState.ACTIVE.value,
        # A claim moves the refresh time to the claim's own, so an intent left by a refresh
        # cut short is due at once; a recovery that has to wait (for requests that may still
        # be at the provider) moves it later.
        grants.c.next_refresh_at <= now,
        _lease_free(bindparam(_OWNER), now, dead_before, judging=judging),
    )
    by_ids = due.where(grants.c.id.in_(bindparam(_IDS, expanding=True)))
    if server_clock:
        by_ids = by_ids.with_for_update(skip_locked=True, of=grants)
    return _ClaimSql(live, due, by_ids)


@functools.lru_cache(maxsize=64)
def _take_sql(server_clock: bool, count: int) -> Update:
    """The lease and intent of `count` claimed grants, each at its own version."""
    now = clock_now(server_clock)
    ids = [bindparam(f"{_TAKE_ID}{i}", type_=grants.c.id.type) for i in range(count)]
    versions = [bindparam(f"{_TAKE_VERSION}{i}", type_=Integer) for i in range(count)]
    return (
        update(grants)
        .where(grants.c.id.in_(ids))
        .values(
            lease_owner=bindparam(_OWNER),
            lease_expires_at=clock_shifted(server_clock, _LEASE_UNTIL),
            intent_at=func.coalesce(grants.c.intent_at, now),
            # Due now, should this refresh be cut short (see `_claim_sql`).
            next_refresh_at=case(
                (grants.c.next_refresh_at <= now, grants.c.next_refresh_at), else_=now
            ),
            updated_at=now,
            version=case(*zip(ids, versions, strict=True), value=grants.c.id),
        )
        .returning(grants.c.id, grants.c.intent_at, grants.c.updated_at)
    )
