"""Group commit (broker.store.group): writes queued during one transaction go in the next."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.crypto import Keyring
from broker.errors import ConflictError, StoreUnavailable
from broker.model import Grant, Secret, TokenSet
from broker.store.group import GroupCommit
from broker.store.repository import GrantRepository
from broker.store.rotations import _Commit
from broker.store.session import Database
from broker.tasks import Tasks
from tests.conftest import migrated
from tests.test_follower import new_grant

NOW = datetime.now(UTC)


class Ledger:
    """A flush that records its batches, answers per item, and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def flush(self, items: Sequence[int]) -> list[str | Exception]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"odd {i}") if i % 2 else f"stored {i}" for i in items]


async def test_one_write_alone_goes_at_once() -> None:
    ledger = Ledger()
    group: GroupCommit[int, str] = GroupCommit(ledger.flush, limit=10, name="test")
    assert await group.submit(2) == "stored 2"
    assert ledger.batches == [[2]]


async def test_writes_queued_during_a_commit_go_together_each_with_its_own_answer() -> None:
    ledger = Ledger()
    ledger.gate.clear()
    group: GroupCommit[int, str] = GroupCommit(ledger.flush, limit=3, name="test")
    tasks = Tasks()
    first = tasks.spawn(group.submit(0), "write")
    await asyncio.sleep(0)
    queued = [tasks.spawn(group.submit(i), "write") for i in range(1, 6)]
    await asyncio.sleep(0)
    ledger.gate.set()
    assert await first == "stored 0"
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert ledger.batches == [[0], [1, 2, 3], [4, 5]]  # at most `limit` in one transaction
    assert [str(r) for r in results] == ["odd 1", "stored 2", "odd 3", "stored 4", "odd 5"]
    assert isinstance(results[0], ValueError)


async def test_a_failed_transaction_fails_each_of_its_writes_with_an_error_of_its_own() -> None:
    ledger = Ledger()
    ledger.gate.clear()
    ledger.fail = StoreUnavailable("the database cannot be reached")
    group: GroupCommit[int, str] = GroupCommit(ledger.flush, limit=10, name="test")
    tasks = Tasks()
    writes = [tasks.spawn(group.submit(i), "write") for i in (2, 4)]
    await asyncio.sleep(0)
    ledger.gate.set()
    errors = await asyncio.gather(*writes, return_exceptions=True)
    assert all(isinstance(e, StoreUnavailable) for e in errors)
    assert errors[0] is not errors[1]


async def test_a_write_whose_submitter_gave_up_before_its_batch_is_dropped() -> None:
    ledger = Ledger()
    ledger.gate.clear()
    group: GroupCommit[int, str] = GroupCommit(ledger.flush, limit=10, name="test")
    tasks = Tasks()
    first = tasks.spawn(group.submit(0), "write")
    await asyncio.sleep(0)
    abandoned = tasks.spawn(group.submit(2), "write")
    kept = tasks.spawn(group.submit(4), "write")
    await asyncio.sleep(0)
    abandoned.cancel()
    ledger.gate.set()
    assert await first == "stored 0"
    assert await kept == "stored 4"
    assert ledger.batches == [[0], [4]]


@pytest.fixture
def engine(store_engine: AsyncEngine) -> AsyncEngine:
    """A migrated store on SQLite or PostgreSQL: the batch is one executemany on both, and
    only SQLite's driver counts the rows an executemany changed."""
    return store_engine


class CountingRepository(GrantRepository):
    """The real repository, counting the transactions that commit refreshes."""

    transactions = 0

    async def _commit_many(self, commits: Sequence[_Commit]) -> list[Grant | Exception]:
        self.transactions += 1
        return await super()._commit_many(commits)


async def test_refreshes_ending_together_are_committed_in_few_transactions(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """Fifty commits at once: each lands at generation + 1 with a version of its own, a stale
    one is refused alone, and they take far fewer than fifty transactions."""
    repo = CountingRepository(engine, keyring)
    stored = [await repo.insert(new_grant(f"u{i}"), NOW) for i in range(50)]
    renewed = [
        replace(g, tokens=TokenSet(Secret(f"rt2-{i}"), Secret(f"at2-{i}")))
        for i, g in enumerate(stored)
    ]
    stale = 1  # this one expects a generation the store no longer has
    results = await asyncio.gather(
        *(
            repo.commit_refresh(g, g.generation + (i == stale), f"w{i}", NOW)
            for i, g in enumerate(renewed)
        ),
        return_exceptions=True,
    )
    assert isinstance(results[stale], ConflictError)
    landed = [r for r in results if isinstance(r, Grant)]
    assert len(landed) == 49
    assert len({g.version for g in landed}) == 49
    assert repo.transactions < 10
    for grant in landed:
        again = await repo.get("p", grant.user)
        assert again is not None
        assert again.generation == grant.generation
        assert again.tokens.refresh_token == grant.tokens.refresh_token
        assert again.version == grant.version
    with pytest.raises(ConflictError):
        await repo.commit_refresh(renewed[0], 0, "again", NOW)


async def test_the_same_grant_twice_in_one_batch_lands_in_order_each_fenced_by_the_one_before(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """Never the case under a lease, but exact all the same: each write is judged against the
    row as the writes before it in the batch left it."""
    repo = CountingRepository(engine, keyring)
    stored = await repo.insert(new_grant("twice"), NOW)
    first = replace(stored, tokens=TokenSet(Secret("rt-a"), Secret("at-a")))
    second = replace(stored, tokens=TokenSet(Secret("rt-b"), Secret("at-b")))
    results = await asyncio.gather(
        repo.commit_refresh(first, stored.generation, "wa", NOW),
        repo.commit_refresh(second, stored.generation + 1, "wb", NOW),
        repo.commit_refresh(first, stored.generation, "wc", NOW),  # stale by then
        return_exceptions=True,
    )
    assert repo.transactions == 1
    a, b, c = results
    assert isinstance(a, Grant)
    assert isinstance(b, Grant)
    assert (a.generation, b.generation) == (stored.generation + 1, stored.generation + 2)
    assert isinstance(c, ConflictError)
    again = await repo.get("p", "twice")
    assert again is not None
    assert again.generation == stored.generation + 2
    assert again.tokens.refresh_token == Secret("rt-b")
    assert again.version == b.version


async def test_a_batch_costs_the_same_statements_whatever_its_size(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """The rows of a batch are written by one executemany, not a statement each."""
    repo = GrantRepository(engine, keyring)
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    async def batch(size: int, tag: str) -> int:
        stored = [await repo.insert(new_grant(f"{tag}{i}"), NOW) for i in range(size)]
        statements.clear()
        event.listen(engine.sync_engine, "before_cursor_execute", count)
        try:
            results = await asyncio.gather(
                *(
                    repo.commit_refresh(g, g.generation, f"{tag}w{i}", NOW)
                    for i, g in enumerate(stored)
                )
            )
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", count)
        assert all(isinstance(r, Grant) for r in results)
        return len(statements)

    assert await batch(2, "small") == await batch(20, "large")


async def test_writes_that_queue_while_the_store_is_busy_go_in_one_transaction(
    tmp_path: Path, keyring: Keyring
) -> None:
    """On SQLite, whose writes take turns: a batch is gathered once the store is free, so the
    first write does not take a transaction of its own while the others wait behind it."""
    async with migrated(f"sqlite:///{tmp_path / 'busy.db'}") as engine:
        await _queue_while_busy(engine, keyring)


async def _queue_while_busy(engine: AsyncEngine, keyring: Keyring) -> None:
    repo = CountingRepository(engine, keyring)
    stored = [await repo.insert(new_grant(f"busy{i}"), NOW) for i in range(3)]
    tasks = Tasks()
    writes = []
    async with Database(engine).write():  # another write of this process holds the store
        for i, g in enumerate(stored):  # one after another, each queued before the next
            writes.append(
                tasks.spawn(repo.commit_refresh(g, g.generation, f"busy-w{i}", NOW), "write")
            )
            for _ in range(5):
                await asyncio.sleep(0)
    results = await asyncio.gather(*writes)
    assert all(isinstance(r, Grant) for r in results)
    assert repo.transactions == 1


async def test_writes_still_queued_when_the_batching_is_cancelled_fail_instead_of_waiting() -> None:
    ledger = Ledger()
    never = asyncio.Event()
    group: GroupCommit[int, str] = GroupCommit(
        ledger.flush, limit=10, name="test", ready=never.wait
    )
    tasks = Tasks()
    writes = [tasks.spawn(group.submit(i), "write") for i in (2, 4)]
    for _ in range(3):  # the writes queue, and the batching waits for the store
        await asyncio.sleep(0)
    draining = group._draining
    assert draining is not None
    draining.cancel()
    errors = await asyncio.gather(*writes, return_exceptions=True)
    assert all(isinstance(e, StoreUnavailable) for e in errors)
    assert ledger.batches == []


async def test_a_write_that_landed_in_an_earlier_attempt_is_a_conflict_not_landed_again(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """A retry whose earlier attempt landed after all misses its fence: it is answered as a
    conflict (the rotation then finds its write by its id), not counted as landed by this
    batch because the row's last write carries its id, and the row is not stamped again."""
    repo = CountingRepository(engine, keyring)
    first, other = [await repo.insert(new_grant(f"again{i}"), NOW) for i in range(2)]
    renewed = replace(first, tokens=TokenSet(Secret("rt-again"), Secret("at-again")))
    landed = await repo.commit_refresh(renewed, first.generation, "w-again", NOW)
    retry, alongside = await asyncio.gather(
        repo.commit_refresh(renewed, first.generation, "w-again", NOW),  # the same write
        repo.commit_refresh(other, other.generation, "w-other", NOW),
        return_exceptions=True,
    )
    assert isinstance(retry, ConflictError)
    assert isinstance(alongside, Grant)
    again = await repo.get("p", "again0")
    assert again is not None
    assert again.version == landed.version  # not stamped by the retry
    assert await repo.written_by(first.id, "w-again") is not None
