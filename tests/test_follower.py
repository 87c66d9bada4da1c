"""Following the shared store: the change sequence, PostgreSQL's feed, and waiting for a change.

Two "brokers" are two repositories (each with its own engine) on one store: what one writes,
the other's follower must publish, in version order, and say how long it took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.cache import GrantCache
from broker.config import StoreConfig
from broker.crypto import Keyring
from broker.follower import POLL, Follower
from broker.metrics import Metrics
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.engine import create_engine, file_probe, listener_params
from broker.store.feed import PgListener, parse_notice
from broker.store.migrate import upgrade
from broker.store.repository import GrantRepository
from broker.tasks import Tasks

NOW = datetime.now(UTC)


@pytest.fixture
async def engines(store_url: str) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """Two engines on one migrated store, as two brokers would have."""
    first, second = create_engine(store_url), create_engine(store_url)
    try:
        await upgrade(first)
        yield first, second
    finally:
        await first.dispose()
        await second.dispose()


def new_grant(user: str) -> Grant:
    """An active grant for `user`."""
    return Grant(
        id="",
        provider="p",
        user=user,
        state=GrantState.ACTIVE,
        generation=0,
        tokens=TokenSet(refresh_token=Secret(f"rt-{user}"), access_token=Secret(f"at-{user}")),
        access_expires_at=NOW + timedelta(hours=1),
        next_refresh_at=NOW + timedelta(minutes=45),
    )


def lag_count(metrics: Metrics) -> float:
    """How many lags the follower observed."""
    value = metrics.registry.get_sample_value("token_broker_fleet_change_lag_seconds_count")
    return 0.0 if value is None else value


async def test_a_write_made_elsewhere_is_published_and_its_lag_measured(
    engines: tuple[AsyncEngine, AsyncEngine], keyring: Keyring
) -> None:
    """What another broker writes reaches this one's cache at the next sync, in version order;
    the first load is not counted as lag, later writes from elsewhere are, own ones are not."""
    here, there = GrantRepository(engines[0], keyring), GrantRepository(engines[1], keyring)
    cache, metrics = GrantCache(), Metrics(["p"])
    follower = Follower(here, cache, metrics, lambda: datetime.now(UTC))
    first = await there.insert(new_grant("alice"), NOW)
    await follower.sync()
    assert cache.get("p", "alice") == first
    assert lag_count(metrics) == 0  # the initial load
    second = await there.replace_tokens(first, first.generation, NOW)
    mine = await here.insert(new_grant("bob"), NOW)
    cache.put(mine)  # this broker's own write, published when it was made
    await follower.sync()
    assert cache.get("p", "alice") == second
    assert lag_count(metrics) == 1
    assert follower.seen_version == mine.version


async def test_a_notice_marks_the_grant_behind_until_the_write_is_read(
    engines: tuple[AsyncEngine, AsyncEngine], keyring: Keyring
) -> None:
    """A notice alone tells the token path the cached version is stale; the sync that reads the
    write clears it."""
    here, there = GrantRepository(engines[0], keyring), GrantRepository(engines[1], keyring)
    cache = GrantCache()
    follower = Follower(here, cache, Metrics(["p"]), lambda: datetime.now(UTC))
    grant = await there.insert(new_grant("alice"), NOW)
    await follower.sync()
    cached = cache.get("p", "alice")
    assert cached is not None
    newer = await there.replace_tokens(grant, grant.generation, NOW)
    follower.notice(grant.id, newer.version, False)
    assert follower.behind(cached)
    await follower.sync()
    current = cache.get("p", "alice")
    assert current is not None
    assert not follower.behind(current)


async def test_a_deletion_made_elsewhere_drops_the_grant(
    engines: tuple[AsyncEngine, AsyncEngine], keyring: Keyring
) -> None:
    """A grant deleted by another broker is dropped here at the next sync."""
    here, there = GrantRepository(engines[0], keyring), GrantRepository(engines[1], keyring)
    cache = GrantCache()
    follower = Follower(here, cache, Metrics(["p"]), lambda: datetime.now(UTC))
    grant = await there.insert(new_grant("alice"), NOW)
    await follower.sync()
    assert await there.delete(grant.id, NOW)
    await follower.sync()
    assert cache.get("p", "alice") is None


async def test_changes_are_read_in_pages_each_with_the_deletions_it_reaches(
    engines: tuple[AsyncEngine, AsyncEngine], keyring: Keyring
) -> None:
    """A page holds at most `limit` writes, the deletions up to its last version and no
    later, and says whether more follow; read page after page, nothing is missed."""
    here, there = GrantRepository(engines[0], keyring), GrantRepository(engines[1], keyring)
    users = [f"u{i}" for i in range(5)]
    stored = [await there.insert(new_grant(user), NOW) for user in users]
    assert await there.delete(stored[1].id, NOW)  # a deletion after every insert
    recreated = await there.insert(new_grant(users[1]), NOW)
    first = await here.changes_since(0, 2)
    assert [g.user for g in first.written] == ["u0", "u2"]  # u1's first row is gone
    assert first.more
    assert first.deleted == []  # its deletion comes after this page's last version
    seen = first.version
    pages = [first]
    while pages[-1].more:
        pages.append(await here.changes_since(seen, 2))
        seen = pages[-1].version
    assert [g.user for page in pages for g in page.written] == ["u0", "u2", "u3", "u4", "u1"]
    assert [d.grant_id for page in pages for d in page.deleted] == [stored[1].id]
    assert seen == recreated.version
    cache = GrantCache()
    follower = Follower(here, cache, Metrics(["p"]), lambda: datetime.now(UTC))
    await follower.sync()
    assert {g.user: g.id for g in cache} == {
        **{g.user: g.id for g in stored if g.user != "u1"},
        "u1": recreated.id,
    }


async def test_waiting_for_a_change_follows_the_store_closely(
    engines: tuple[AsyncEngine, AsyncEngine], keyring: Keyring
) -> None:
    """A caller waiting on a grant another broker is changing gets the change within a few
    polls, without any loop running."""
    here, there = GrantRepository(engines[0], keyring), GrantRepository(engines[1], keyring)
    cache = GrantCache()
    follower = Follower(here, cache, Metrics(["p"]), lambda: datetime.now(UTC))
    grant = await there.insert(new_grant("alice"), NOW)
    await follower.sync()
    cached = cache.get("p", "alice")
    assert cached is not None
    tasks = Tasks()
    waiting = tasks.spawn(follower.wait_for_change(cached, 5), "wait")
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await there.replace_tokens(grant, grant.generation, NOW)
    await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - started < 1
    current = cache.get("p", "alice")
    assert current is not None
    assert current.generation == grant.generation + 1


@pytest.mark.postgres
async def test_postgresql_notifies_every_write_with_its_grant_and_version(
    postgres_url: str, keyring: Keyring
) -> None:
    """Each write is announced on the feed at commit, naming the grant and version (never a
    token); a broker hears its own notices back (the echo a claim waits for)."""
    engine = create_engine(postgres_url)
    tasks = Tasks()
    try:
        await upgrade(engine)
        repo = GrantRepository(engine, keyring)
        heard: list[tuple[str, int, bool]] = []
        listener = PgListener(*listener_params(StoreConfig(url=postgres_url)))
        listener.on_notice = lambda grant, version, gone: heard.append((grant, version, gone))
        tasks.spawn(listener.run(), "listen")
        for _ in range(100):
            if listener.connected:
                break
            await asyncio.sleep(0.05)
        assert listener.connected
        grant = await repo.insert(new_grant("alice"), NOW)
        assert await listener.echo(grant.id, grant.version, 2)
        assert await repo.delete(grant.id, NOW)
        for _ in range(100):
            if len(heard) == 2:
                break
            await asyncio.sleep(0.02)
        assert heard[0] == (grant.id, grant.version, False)
        assert heard[1][0] == grant.id
        assert heard[1][2] is True
        assert heard[1][1] > grant.version
    finally:
        await tasks.cancel_all()
        await engine.dispose()


@pytest.mark.parametrize(
    ("payload", "parsed"),
    [
        ("abc 12", ("abc", 12, False)),
        ("abc 12 deleted", ("abc", 12, True)),
        ("abc", None),
        ("abc twelve", None),
        ("abc 12 gone", None),
        ("", None),
    ],
)
def test_only_well_formed_notices_are_read(
    payload: str, parsed: tuple[str, int, bool] | None
) -> None:
    """A notice is `GRANT_ID VERSION [deleted]`; anything else on the channel is ignored."""
    assert parse_notice(payload) == parsed


async def test_the_file_probe_moves_with_every_commit_by_anyone(
    tmp_path: Path, keyring: Keyring
) -> None:
    """A SQLite store's fingerprint changes when another connection commits, and only then."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    probe = file_probe(url)
    assert probe is not None
    assert file_probe("sqlite://") is None  # in memory: nothing to look at
    engine = create_engine(url)
    try:
        await upgrade(engine)
        repository = GrantRepository(engine, keyring)
        before = probe()
        assert probe() == before
        await repository.insert(new_grant("alice"), NOW)
        after = probe()
        assert after != before
        await repository.all()  # a read commits nothing
        assert probe() == after
    finally:
        await engine.dispose()


async def test_a_follower_with_a_probe_reads_only_when_the_store_changed(
    tmp_path: Path, keyring: Keyring
) -> None:
    """While the files stand still the follower does not query (an idle broker costs nothing);
    a commit by another process is still published within a poll."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    here_engine, there_engine = create_engine(url), create_engine(url)
    queries: list[str] = []

    def count(*args: object) -> None:
        queries.append(str(args[2]))

    event.listen(here_engine.sync_engine, "before_cursor_execute", count)
    tasks = Tasks()
    try:
        await upgrade(there_engine)
        here, there = GrantRepository(here_engine, keyring), GrantRepository(there_engine, keyring)
        cache = GrantCache()
        follower = Follower(
            here, cache, Metrics(["p"]), lambda: datetime.now(UTC), probe=file_probe(url)
        )
        await follower.sync()
        queries.clear()
        published = asyncio.Event()
        tasks.spawn(follower.run(published.set), "follow")
        await asyncio.sleep(POLL * 2.5)  # two polls with nothing written
        assert [q for q in queries if "FROM grants" in q] == []
        grant = await there.insert(new_grant("alice"), NOW)
        await asyncio.wait_for(published.wait(), POLL * 3)
        assert cache.get("p", "alice") == grant
    finally:
        await tasks.cancel_all()
        await here_engine.dispose()
        await there_engine.dispose()


async def test_own_writes_next_in_the_sequence_are_not_read_back(
    engines: tuple[AsyncEngine, AsyncEngine], keyring: Keyring
) -> None:
    """A write published here at the very next version moves the follower past it (nothing
    before it is unseen); one that skips a version written elsewhere leaves the sequence to
    be read, and the read then finds the other write."""
    here, there = GrantRepository(engines[0], keyring), GrantRepository(engines[1], keyring)
    cache = GrantCache()
    follower = Follower(here, cache, Metrics(["p"]), lambda: datetime.now(UTC))
    await follower.sync()
    mine = await here.insert(new_grant("alice"), NOW)
    cache.put(mine)
    assert follower.seen_version == mine.version
    assert (await here.changes_since(follower.seen_version)).written == []
    theirs = await there.insert(new_grant("bob"), NOW)
    later = await here.insert(new_grant("carol"), NOW)
    cache.put(later)
    assert follower.seen_version == mine.version  # bob's version lies between: not seen yet
    await follower.sync()
    assert cache.get("p", "bob") == theirs
    assert follower.seen_version == later.version
