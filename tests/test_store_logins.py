"""Device logins in the store, on SQLite and on a real PostgreSQL server: sealed, claimed once,
ended once; and migration 0006 on a store that already holds code-flow logins."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.crypto import Keyring
from broker.errors import LoginError
from broker.store.engine import create_engine, writer
from broker.store.logins import COMPLETE, DEVICE, EXPIRED, FAILED, LoginRepository
from broker.store.migrate import current_revision, script_location, upgrade
from broker.store.sealing import Sealer
from broker.store.tables import logins

NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=10)


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty store, disposed after the test."""
    engine = create_engine(store_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def device_answer(new_secret: Callable[[str], str]) -> str:
    """What the login service seals for a device login."""
    return json.dumps({"device_code": new_secret("device"), "user_code": "WDJB-MJHT"})


async def stored_device(engine: AsyncEngine, login_id: str) -> bytes | None:
    async with engine.connect() as conn:
        query = select(logins.c.device).where(logins.c.id == login_id)
        value: bytes | None = (await conn.execute(query)).scalar_one()
        return value


async def test_a_device_login_is_sealed_and_read_back_while_pending(
    engine: AsyncEngine, keyring: Keyring, new_secret: Callable[[str], str]
) -> None:
    """The device answer is stored as an envelope without the device code in clear, and the
    pending login for the grant opens it again; another grant has none."""
    await upgrade(engine)
    repo = LoginRepository(engine, Sealer(keyring))
    answer = device_answer(new_secret)
    await repo.insert_device(
        login_id="l1",
        provider="p",
        user="alice",
        device=answer,
        force=False,
        now=NOW,
        expires_at=LATER,
    )
    sealed = await stored_device(engine, "l1")
    assert sealed is not None
    assert json.loads(answer)["device_code"].encode() not in sealed
    pending = await repo.pending_device("p", "alice", NOW)
    assert pending is not None
    assert (pending.id, pending.device, pending.force) == ("l1", answer, False)
    assert await repo.pending_device("p", "bob", NOW) is None
    assert await repo.pending_device("p", "alice", LATER) is None  # expired
    record = await repo.get("l1", NOW)
    assert record is not None
    assert (record.status, record.method) == ("pending", DEVICE)


async def test_a_device_login_is_claimed_once_and_its_secret_erased_when_it_ends(
    engine: AsyncEngine, keyring: Keyring, new_secret: Callable[[str], str]
) -> None:
    """The first claim wins (with the force a joining request lent it); a second claim is
    refused; finishing erases the sealed answer."""
    await upgrade(engine)
    repo = LoginRepository(engine, Sealer(keyring))
    await repo.insert_device(
        login_id="l1",
        provider="p",
        user="alice",
        device=device_answer(new_secret),
        force=False,
        now=NOW,
        expires_at=LATER,
    )
    await repo.insist_on_force("l1")
    claimed = await repo.claim_device("l1", NOW)
    assert (claimed.method, claimed.force, claimed.nonce, claimed.code_verifier) == (
        DEVICE,
        True,
        None,
        None,
    )
    with pytest.raises(LoginError, match="already ended"):
        await repo.claim_device("l1", NOW)
    await repo.finish("l1", COMPLETE, None, NOW)
    assert await stored_device(engine, "l1") is None
    assert await repo.fail_unfinished("l1", "too late", NOW) is False
    record = await repo.get("l1", NOW)
    assert record is not None
    assert record.status == COMPLETE


async def test_an_unfinished_device_login_ends_failed_once_and_reads_expired_after_expiry(
    engine: AsyncEngine, keyring: Keyring, new_secret: Callable[[str], str]
) -> None:
    """fail_unfinished ends a pending login with its reason (and erases the answer) once; a
    pending login past its expiry reads as failed with the device wording and cannot be
    claimed."""
    await upgrade(engine)
    repo = LoginRepository(engine, Sealer(keyring))
    for login_id in ("stopped", "left"):
        await repo.insert_device(
            login_id=login_id,
            provider="p",
            user=login_id,
            device=device_answer(new_secret),
            force=False,
            now=NOW,
            expires_at=LATER,
        )
    assert await repo.fail_unfinished("stopped", "the broker stopped", NOW) is True
    assert await repo.fail_unfinished("stopped", "again", NOW) is False
    stopped = await repo.get("stopped", NOW)
    assert stopped is not None
    assert (stopped.status, stopped.error) == (FAILED, "the broker stopped")
    assert await stored_device(engine, "stopped") is None

    left = await repo.get("left", LATER)
    assert left is not None
    assert (left.status, left.error) == (FAILED, EXPIRED[DEVICE])
    with pytest.raises(LoginError, match="expired before anyone entered it"):
        await repo.claim_device("left", LATER)


async def downgrade(engine: AsyncEngine, target: str) -> None:
    """Alembic's downgrade, the way `broker.store.migrate.upgrade` runs an upgrade."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))

    def run(conn: Connection) -> None:
        config.attributes["connection"] = conn
        command.downgrade(config, target)

    async with writer(engine).begin() as conn:
        await conn.run_sync(run)


async def test_migration_0006_keeps_code_logins_and_its_downgrade_drops_device_logins(
    engine: AsyncEngine, keyring: Keyring, new_secret: Callable[[str], str]
) -> None:
    """A code-flow login from before 0006 reads as one after it; going back to 0004 removes
    the device logins (they cannot exist there) and keeps the code-flow one; up again works."""
    await upgrade(engine, "0004")
    async with writer(engine).begin() as conn:
        # Only the columns 0004 has: the table as tables.py declares it has two more.
        await conn.execute(
            insert(logins).values(
                id="old",
                provider="p",
                user_name="alice",
                state_hash="h" * 64,
                status="pending",
                created_at=NOW,
                expires_at=LATER,
            )
        )
    await upgrade(engine)
    repo = LoginRepository(engine, Sealer(keyring))
    old = await repo.get("old", NOW)
    assert old is not None
    assert (old.method, old.status) == ("code", "pending")
    await repo.insert_device(
        login_id="new",
        provider="p",
        user="bob",
        device=device_answer(new_secret),
        force=False,
        now=NOW,
        expires_at=LATER,
    )
    await downgrade(engine, "0004")
    assert await current_revision(engine) == "0004"
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT id FROM logins")).all()
    assert [row[0] for row in rows] == ["old"]
    await upgrade(engine)
    assert await repo.get("old", NOW) is not None
