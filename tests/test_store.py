"""The grant repository and its engines, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.crypto import Keyring
from broker.errors import ConflictError, DecryptError
from broker.model import Grant, GrantState, GrantSummary, Secret, TokenSet
from broker.store.engine import create_engine, writer
from broker.store.migrate import upgrade
from broker.store.repository import GrantRepository, KeyUsage
from broker.store.tables import grants
from tests.conftest import migrated

NOW = datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)

NewSecret = Callable[[str], str]


def make_grant(new_secret: NewSecret, user: str = "alice", provider: str = "techniek") -> Grant:
    """An active grant holding fresh secret values in every sealed column."""
    return Grant(
        id="",
        provider=provider,
        user=user,
        state=GrantState.ACTIVE,
        generation=0,
        tokens=TokenSet(
            refresh_token=Secret(new_secret("rt")),
            access_token=Secret(new_secret("at")),
            id_token=Secret(new_secret("idt")),
        ),
        sub=f"sub-of-{user}",
        scopes=("openid", "profile"),
        access_expires_at=NOW + timedelta(hours=10),
        next_refresh_at=NOW + timedelta(hours=7, microseconds=42),
        claims={"email": f"{user}@example.nl", "permission_management": new_secret("pm")},
    )


def rotated_tokens(grant: Grant, new_secret: NewSecret) -> Grant:
    """`grant` with a new refresh and access token, as a refresh would produce."""
    tokens = TokenSet(refresh_token=Secret(new_secret("rt")), access_token=Secret(new_secret("at")))
    return replace(grant, tokens=tokens)


def secrets_of(grant: Grant) -> list[str]:
    """Every secret value a grant carries, claims included."""
    tokens = [grant.tokens.refresh_token, grant.tokens.access_token, grant.tokens.id_token]
    return [t.reveal() for t in tokens if t is not None] + [
        str(v) for v in grant.claims.values() if str(v).startswith("pm-")
    ]


def contents(grant: Grant) -> tuple[Any, ...]:
    """What must survive re-encryption: everything but the key id."""
    return (grant.id, grant.generation, grant.tokens, grant.claims, grant.updated_at)


def only_primary(keyring: Keyring) -> Keyring:
    """`keyring` without its old keys: what remains once a rotation has been completed."""
    return Keyring(keyring.primary, {keyring.primary: keyring.keys[keyring.primary]})


async def insert_many(repo: GrantRepository, new_secret: NewSecret, count: int) -> list[Grant]:
    return [await repo.insert(make_grant(new_secret, f"user{i:02d}"), NOW) for i in range(count)]


@pytest.fixture
def engine(store_engine: AsyncEngine) -> AsyncEngine:
    """A migrated store on SQLite or PostgreSQL."""
    return store_engine


@pytest.fixture
def repo(engine: AsyncEngine, keyring: Keyring) -> GrantRepository:
    """A repository on the migrated store with the test's keyring."""
    return GrantRepository(engine, keyring)


# -- round trips ----------------------------------------------------------------------------


async def test_inserted_grant_reads_back_equal(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """A grant comes back from get, get_by_id and all exactly as insert returned it."""
    stored = await repo.insert(make_grant(new_secret), NOW)
    assert stored.id
    assert stored.key_id == repo.keyring.primary
    assert await repo.get("techniek", "alice") == stored
    assert await repo.get_by_id(stored.id) == stored
    assert await repo.all() == [stored]


async def test_get_of_unknown_grant_is_none(repo: GrantRepository) -> None:
    """Looking up a grant that does not exist gives None, not an error."""
    assert await repo.get("techniek", "nobody") is None
    assert await repo.get_by_id("0" * 32) is None


async def test_all_orders_by_provider_then_user(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """all() lists grants sorted by provider, then user."""
    for provider, user in [("zeta", "a"), ("alpha", "b"), ("alpha", "a")]:
        await repo.insert(make_grant(new_secret, user, provider), NOW)
    assert [g.name for g in await repo.all()] == ["alpha/a", "alpha/b", "zeta/a"]


async def test_summaries_read_without_opening_equal_those_of_the_opened_grants(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """The admin views, read from the plain columns alone, equal the summaries of the opened
    grants at any moment: active, refused, and without a refresh token before and after its
    access token expires (when callers see reauth_required), or without an access token."""
    full = make_grant(new_secret, "alice")
    refused = replace(make_grant(new_secret, "bob"), state=GrantState.REAUTH_REQUIRED)
    mortal = replace(
        make_grant(new_secret, "carol"),
        tokens=TokenSet(access_token=Secret(new_secret("at"))),
        access_expires_at=NOW + timedelta(minutes=1),
        scopes=(),
    )
    tokenless = replace(
        make_grant(new_secret, "dave", "p2"), tokens=TokenSet(), access_expires_at=None
    )
    for grant in (full, refused, mortal, tokenless):
        await repo.insert(grant, NOW)
    opened = await repo.all()
    for now in (NOW, NOW + timedelta(minutes=2), NOW + timedelta(hours=11)):
        assert await repo.summaries(now) == [GrantSummary.of(g, now) for g in opened]
    [carol] = await repo.summaries(LATER, "techniek", "carol")
    assert (carol.state, carol.has_refresh_token) == (GrantState.REAUTH_REQUIRED, False)
    assert await repo.summaries(NOW, "techniek", "nobody") == []


async def test_grant_without_secrets_round_trips_unsealed(repo: GrantRepository) -> None:
    """A grant with no tokens and no claims is stored with no key id and reads back empty."""
    bare = Grant(
        id="",
        provider="p",
        user="u",
        state=GrantState.REAUTH_REQUIRED,
        generation=0,
        tokens=TokenSet(),
        last_error="rotation_lost",
    )
    stored = await repo.insert(bare, NOW)
    assert stored.key_id is None
    assert await repo.get("p", "u") == stored


async def test_insert_starts_at_generation_one(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """Whatever generation the caller passes, a new row starts at generation 1."""
    stored = await repo.insert(replace(make_grant(new_secret), generation=7), NOW)
    assert stored.generation == 1
    fetched = await repo.get("techniek", "alice")
    assert fetched is not None
    assert fetched.generation == 1


async def test_datetimes_come_back_aware_utc_to_the_microsecond(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """Aware datetimes in any zone come back in UTC, equal to the microsecond, on both backends."""
    amsterdam = timezone(timedelta(hours=1))
    expiry = datetime(2026, 11, 21, 23, 59, 59, 999999, tzinfo=amsterdam)
    await repo.insert(replace(make_grant(new_secret), access_expires_at=expiry), NOW)
    fetched = await repo.get("techniek", "alice")
    assert fetched is not None
    for value in (fetched.access_expires_at, fetched.next_refresh_at, fetched.created_at):
        assert value is not None
        assert value.tzinfo is UTC
    assert fetched.access_expires_at == expiry
    assert fetched.next_refresh_at == NOW + timedelta(hours=7, microseconds=42)
    assert fetched.created_at == NOW


async def test_naive_datetime_is_refused(repo: GrantRepository, new_secret: NewSecret) -> None:
    """A naive datetime never reaches the database, where its zone would be guessed."""
    naive = replace(make_grant(new_secret), access_expires_at=datetime(2026, 1, 1))  # noqa: DTZ001
    with pytest.raises(StatementError, match="naive datetime"):
        await repo.insert(naive, NOW)
    assert await repo.all() == []


async def test_store_many_writes_new_and_replaced_grants_that_read_back_equal(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """A bulk write (an import) stores new grants and new tokens over existing ones in one
    transaction; each reads back exactly as returned, its datetimes aware UTC."""
    existing = await repo.insert(make_grant(new_secret, "zoe"), NOW)
    amsterdam = timezone(timedelta(hours=1))
    new = [
        replace(
            make_grant(new_secret, f"user{i:03d}"),
            access_expires_at=datetime(2026, 11, 21, 23, 59, 59, 999999, tzinfo=amsterdam),
            tokens=TokenSet(refresh_token=Secret(new_secret("rt")))
            if i % 2
            else make_grant(new_secret).tokens,
            claims={} if i % 3 else {"email": f"user{i}@example.nl"},
        )
        for i in range(120)
    ]
    stored = await repo.store_many(new, [(rotated_tokens(existing, new_secret), 1)], LATER)
    assert len(stored) == 121
    assert [g.user for g in stored] == [g.user for g in new] + ["zoe"]
    for grant in stored:
        fetched = await repo.get(grant.provider, grant.user)
        assert fetched == grant
        assert fetched.key_id == repo.keyring.primary
        assert fetched.access_expires_at is not None
        assert fetched.access_expires_at.tzinfo is UTC
    assert stored[0].access_expires_at == new[0].access_expires_at
    assert stored[1].tokens == new[1].tokens
    assert stored[1].tokens.access_token is None
    assert [g.generation for g in stored] == [1] * 120 + [2]
    assert stored[-1].created_at == NOW
    versions = [g.version for g in stored]
    assert versions == sorted(set(versions))


async def test_store_many_with_a_taken_address_writes_nothing(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """A new grant whose address someone took meanwhile fails the whole bulk write."""
    taken = await repo.insert(make_grant(new_secret, "bob"), NOW)
    new = [make_grant(new_secret, "alice"), make_grant(new_secret, "bob")]
    with pytest.raises(ConflictError):
        await repo.store_many(new, [], LATER)
    assert await repo.all() == [taken]


async def test_store_many_refuses_a_naive_datetime_and_writes_nothing(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """A naive datetime in a bulk write never reaches the database."""
    naive = replace(make_grant(new_secret, "bob"), next_refresh_at=datetime(2026, 1, 1))  # noqa: DTZ001
    with pytest.raises((ValueError, StatementError), match="naive datetime"):
        await repo.store_many([make_grant(new_secret), naive], [], LATER)
    assert await repo.all() == []


# -- compare-and-swap -----------------------------------------------------------------------


async def test_replace_tokens_with_current_generation_bumps_it(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """A replace at the row's generation stores the new tokens at generation + 1."""
    stored = await repo.insert(make_grant(new_secret), NOW)
    refreshed = rotated_tokens(stored, new_secret)
    written = await repo.replace_tokens(refreshed, expected_generation=1, now=LATER)
    assert written.generation == 2
    fetched = await repo.get("techniek", "alice")
    assert fetched is not None
    assert fetched == written
    assert fetched.tokens == refreshed.tokens
    assert fetched.created_at == NOW
    # A change is stamped by the store's clock: the server's on PostgreSQL.
    if repo.engine.dialect.name == "sqlite":
        assert fetched.updated_at == LATER
    else:
        assert fetched.updated_at is not None
        assert abs((fetched.updated_at - datetime.now(UTC)).total_seconds()) < 60


async def test_replace_tokens_with_stale_generation_conflicts_and_changes_nothing(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """A replace at an old generation raises ConflictError and leaves the row as it was."""
    stored = await repo.insert(make_grant(new_secret), NOW)
    current = await repo.replace_tokens(rotated_tokens(stored, new_secret), 1, LATER)
    with pytest.raises(ConflictError) as caught:
        await repo.replace_tokens(rotated_tokens(stored, new_secret), 1, LATER)
    assert caught.value.retryable
    assert await repo.get("techniek", "alice") == current


async def test_concurrent_replaces_on_one_generation_have_one_winner(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """Two simultaneous replaces expecting the same generation: one wins, one conflicts."""
    stored = await repo.insert(make_grant(new_secret), NOW)
    first, second = rotated_tokens(stored, new_secret), rotated_tokens(stored, new_secret)
    results = await asyncio.gather(
        repo.replace_tokens(first, 1, LATER),
        repo.replace_tokens(second, 1, LATER),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Grant)]
    assert len(winners) == 1
    assert sum(isinstance(r, ConflictError) for r in results) == 1
    assert await repo.get("techniek", "alice") == winners[0]
    assert winners[0].generation == 2


async def test_delete_removes_the_row_once(repo: GrantRepository, new_secret: NewSecret) -> None:
    """delete reports True for an existing grant, then it is gone and a second delete says False."""
    stored = await repo.insert(make_grant(new_secret), NOW)
    other = await repo.insert(make_grant(new_secret, "bob"), NOW)
    assert await repo.delete(stored.id, NOW) is True
    assert await repo.get("techniek", "alice") is None
    assert await repo.delete(stored.id, NOW) is False
    assert await repo.all() == [other]


# -- keys and rotation ----------------------------------------------------------------------


async def test_key_usage_and_count_not_under_count_grants_per_key(
    engine: AsyncEngine, keyring: Keyring, new_secret: NewSecret
) -> None:
    """key_usage counts grants per sealing key, with unsealed grants under None."""
    rotated = keyring.with_new_primary(NOW)
    await insert_many(GrantRepository(engine, keyring), new_secret, 2)
    repo = GrantRepository(engine, rotated)
    await repo.insert(make_grant(new_secret, "new"), NOW)
    await repo.insert(
        Grant(
            id="",
            provider="p",
            user="bare",
            state=GrantState.ACTIVE,
            generation=0,
            tokens=TokenSet(),
        ),
        NOW,
    )
    usage = {u.key_id: u.grants for u in await repo.key_usage()}
    assert usage == {keyring.primary: 2, rotated.primary: 1, None: 1}
    assert await repo.count_not_under(rotated.primary) == 2
    assert await repo.count_not_under(keyring.primary) == 1


async def test_reseal_moves_every_grant_to_the_new_primary_in_batches(
    engine: AsyncEngine, keyring: Keyring, new_secret: NewSecret
) -> None:
    """Resealing 25 grants by 10 takes three batches and keeps every value and generation."""
    before = await insert_many(GrantRepository(engine, keyring), new_secret, 25)
    rotated = keyring.with_new_primary(NOW)
    repo = GrantRepository(engine, rotated)
    assert [await repo.reseal_batch(10) for _ in range(4)] == [10, 10, 5, 0]
    assert await repo.count_not_under(rotated.primary) == 0
    assert await repo.key_usage() == [KeyUsage(rotated.primary, 25)]
    after = await repo.all()
    assert [contents(g) for g in after] == [contents(g) for g in before]
    assert await GrantRepository(engine, only_primary(rotated)).all() == after


async def test_interrupted_reseal_finishes_from_a_fresh_repository(
    engine: AsyncEngine, keyring: Keyring, new_secret: NewSecret
) -> None:
    """A rotation stopped after one batch is finished by a new repository and loses nothing."""
    before = await insert_many(GrantRepository(engine, keyring), new_secret, 25)
    rotated = keyring.with_new_primary(NOW)
    assert await GrantRepository(engine, rotated).reseal_batch(10) == 10

    restarted = GrantRepository(engine, rotated)  # as after a crash: nothing carried over
    assert await restarted.count_not_under(rotated.primary) == 15
    assert [contents(g) for g in await restarted.all()] == [contents(g) for g in before]
    while await restarted.reseal_batch(10):
        pass
    assert await restarted.key_usage() == [KeyUsage(rotated.primary, 25)]
    assert [contents(g) for g in await restarted.all()] == [contents(g) for g in before]


async def test_verify_keys_is_empty_on_a_store_never_migrated(
    tmp_path: Path, keyring: Keyring
) -> None:
    """Before migrations, with no grants table at all, there is nothing to verify."""
    engine = create_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        assert await GrantRepository(engine, keyring).verify_keys() == []
    finally:
        await engine.dispose()


async def test_verify_keys_is_empty_when_the_keyring_fits(
    repo: GrantRepository, new_secret: NewSecret
) -> None:
    """An empty store, and a store sealed with this keyring, give no problems."""
    assert await repo.verify_keys() == []
    await insert_many(repo, new_secret, 3)
    assert await repo.verify_keys() == []


async def test_verify_keys_reports_a_keyring_with_other_key_bytes(
    engine: AsyncEngine, keyring: Keyring, new_secret: NewSecret
) -> None:
    """Same key id with different bytes is reported, naming the key id and no secret."""
    grant = await GrantRepository(engine, keyring).insert(make_grant(new_secret), NOW)
    impostor = Keyring(keyring.primary, {keyring.primary: bytes(32)})
    problems = await GrantRepository(engine, impostor).verify_keys()
    assert len(problems) == 1
    assert keyring.primary in problems[0]
    assert not any(value in problems[0] for value in secrets_of(grant))


async def test_verify_keys_reports_a_missing_key_id(
    engine: AsyncEngine, keyring: Keyring, new_secret: NewSecret
) -> None:
    """A keyring without the key id the store uses is reported with that key id."""
    await GrantRepository(engine, keyring).insert(make_grant(new_secret), NOW)
    problems = await GrantRepository(engine, Keyring.generate(NOW)).verify_keys()
    assert len(problems) == 1
    assert keyring.primary in problems[0]


async def test_unknown_key_triggers_one_keyring_reload(
    engine: AsyncEngine, keyring: Keyring, new_secret: NewSecret
) -> None:
    """A repository meeting a key added since it started re-reads the keyring and opens the row."""
    rotated = keyring.with_new_primary(NOW)
    stored = await GrantRepository(engine, rotated).insert(make_grant(new_secret), NOW)
    reloads: list[Keyring] = []

    def reload() -> Keyring:
        reloads.append(rotated)
        return rotated

    repo = GrantRepository(engine, keyring, reload_keyring=reload)
    assert await repo.get("techniek", "alice") == stored
    assert await repo.get("techniek", "alice") == stored
    assert len(reloads) == 1
    assert repo.keyring is rotated


async def test_reload_that_brings_no_new_key_still_fails(
    engine: AsyncEngine, keyring: Keyring, new_secret: NewSecret
) -> None:
    """Without a reload, or when the reload adds no key, the unknown key raises DecryptError."""
    await GrantRepository(engine, keyring.with_new_primary(NOW)).insert(make_grant(new_secret), NOW)
    with pytest.raises(DecryptError):
        await GrantRepository(engine, keyring).get("techniek", "alice")
    with pytest.raises(DecryptError):
        await GrantRepository(engine, keyring, reload_keyring=lambda: keyring).all()


# -- SQLite: pragmas, write locks, nothing in clear on disk ----------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite store file URL."""
    return f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture
async def sqlite_engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated SQLite store, disposed after the test."""
    async with migrated(sqlite_url) as engine:
        yield engine


@pytest.mark.parametrize(
    ("pragma", "expected"),
    [("journal_mode", "wal"), ("synchronous", 2), ("foreign_keys", 1), ("busy_timeout", 10000)],
)
async def test_sqlite_connections_have_durable_pragmas(
    sqlite_engine: AsyncEngine, pragma: str, expected: object
) -> None:
    """Every connection runs in WAL mode with synchronous=FULL, foreign keys and a 10 s wait."""
    async with sqlite_engine.connect() as conn:
        assert (await conn.exec_driver_sql(f"PRAGMA {pragma}")).scalar_one() == expected


def _with_busy_timeout(engine: AsyncEngine, milliseconds: int) -> AsyncEngine:
    """`engine`, with its connections waiting only `milliseconds` for a lock."""

    @event.listens_for(engine.sync_engine, "connect")
    def _short_wait(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {milliseconds}")
        cursor.close()

    return engine


async def test_sqlite_second_writer_waits_at_begin(
    sqlite_engine: AsyncEngine, sqlite_url: str
) -> None:
    """While one write transaction is open, another writer's BEGIN waits for the lock and gives
    up after busy_timeout, before running any statement; readers still get in."""
    impatient = _with_busy_timeout(create_engine(sqlite_url), 200)
    entered = False
    try:
        async with writer(sqlite_engine).begin():
            async with impatient.connect() as reader:
                await reader.execute(select(func.count()).select_from(grants))
            started = time.monotonic()
            with pytest.raises(OperationalError, match="locked"):
                async with writer(impatient).begin():
                    entered = True
            assert time.monotonic() - started >= 0.15
        assert not entered
        async with writer(impatient).begin() as conn:  # the lock is free again
            await conn.execute(select(1))
    finally:
        await impatient.dispose()


def _disk_bytes(database: Path) -> bytes:
    """The database file and its write-ahead log, as they are on disk right now."""
    files = [database, database.with_name(database.name + "-wal")]
    return b"".join(path.read_bytes() for path in files if path.exists())


async def test_sqlite_files_hold_no_secret_in_clear(
    tmp_path: Path, keyring: Keyring, new_secret: NewSecret
) -> None:
    """No token or claim value appears in the database file or its WAL, before or after the
    checkpoint, while the non-secret sub does, so the scan reads the real rows."""
    database = tmp_path / "broker.db"
    engine = create_engine(f"sqlite:///{database}")
    try:
        await upgrade(engine)
        stored = await insert_many(GrantRepository(engine, keyring), new_secret, 3)
        assert database.with_name("broker.db-wal").stat().st_size > 0
        before_checkpoint = _disk_bytes(database)
    finally:
        await engine.dispose()
    after_checkpoint = _disk_bytes(database)
    values = [value.encode() for grant in stored for value in secrets_of(grant)]
    assert len(values) == 3 * 4
    for on_disk in (before_checkpoint, after_checkpoint):
        assert b"sub-of-user01" in on_disk
        assert [value for value in values if value in on_disk] == []
