"""Nodes of a fleet: identity, liveness, heartbeats, the server's clock, and fleet-wide leases.

On SQLite and on the suite's real PostgreSQL (`store_url`), with two or three "brokers" as
repositories and Fleet objects on one store, their clocks moved by hand where the store uses
the caller's clock (SQLite); on PostgreSQL every stamp is the server's, so liveness there is
driven by really letting time pass (short node timeouts).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.crypto import Keyring
from broker.fleet import Fleet, ServerTime, dead_here, this_node
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.engine import create_engine
from broker.store.migrate import upgrade
from broker.store.nodes import NodeRepository
from broker.store.repository import GrantRepository
from broker.store.rotations import ClaimOutcome
from broker.tasks import Tasks
from tests.model_idp import dead_pid

LEASE = timedelta(seconds=45)
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def engine(store_engine: AsyncEngine) -> AsyncEngine:
    """A migrated store on SQLite or PostgreSQL."""
    return store_engine


def grant_of(provider: str, user: str, due: datetime) -> Grant:
    """An active grant due at `due`."""
    return Grant(
        id="",
        provider=provider,
        user=user,
        state=GrantState.ACTIVE,
        generation=0,
        tokens=TokenSet(refresh_token=Secret(f"rt-{user}"), access_token=Secret(f"at-{user}")),
        access_expires_at=due + timedelta(minutes=5),
        next_refresh_at=due,
    )


# -- identity and liveness on this machine --------------------------------------------------------


def test_two_nodes_never_share_an_id() -> None:
    """A node id is random, made at start: hostname and pid repeat across containers."""
    first, second = this_node(), this_node()
    assert first.id != second.id
    assert (first.hostname, first.pid) == (second.hostname, second.pid)


def test_a_node_of_this_machine_whose_process_is_gone_is_dead() -> None:
    """Same host, kernel boot and pid namespace, and no such process: dead at once."""
    assert dead_here(replace(this_node(), pid=dead_pid()), replace(this_node(), pid=1))


@pytest.mark.parametrize(
    "change",
    [
        {"hostname": "elsewhere.example"},
        {"boot_id": "another-boot"},
        {"pid_namespace": "pid:[4026531000]"},  # another container on this host
        {"boot_id": ""},  # nothing known: never judged by pid
    ],
    ids=["other-host", "other-boot", "other-container", "unknown-boot"],
)
def test_a_node_that_cannot_be_judged_by_its_pid_is_not_declared_dead(
    change: dict[str, str],
) -> None:
    """A gone pid means nothing for a node elsewhere: only its heartbeat can tell (9)."""
    other = replace(this_node(), pid=dead_pid(), **change)
    assert not dead_here(other, this_node())


def test_a_live_process_of_this_machine_is_not_dead() -> None:
    """Our parent runs: its node is alive."""
    assert not dead_here(replace(this_node(), pid=os.getppid()), this_node())


def test_this_process_is_never_declared_dead_by_itself() -> None:
    """Neither this node nor another node of this very process is judged dead by its pid."""
    me = this_node()
    assert not dead_here(me, me)
    assert not dead_here(replace(this_node(), pid=me.pid), me)


def test_server_time_is_carried_forward_by_the_monotonic_clock() -> None:
    """Between heartbeats the server's clock is the last reading plus monotonic time, the
    reading dated half-way through its round trip."""
    mono = [100.0]
    server = ServerTime(NOW, monotonic=lambda: mono[0])
    mono[0] = 103.0
    assert server() == NOW + timedelta(seconds=3)
    server.measured(NOW + timedelta(seconds=10), sent=104.0, received=104.2)
    mono[0] = 105.0
    assert server() == NOW + timedelta(seconds=10.9)


# -- the store's view ----------------------------------------------------------------------------


async def test_a_stopped_node_holds_no_lease(engine: AsyncEngine, keyring: Keyring) -> None:
    """A lease of a node marked stopped is free at once: idle ones are cleared, and one with an
    open intent is claimable, its intent kept for recovery (7)."""
    repo = GrantRepository(engine, keyring)
    nodes = NodeRepository(engine, timedelta(seconds=10))
    a, b = this_node(), this_node()
    for node in (a, b):
        await nodes.register(node, NOW)
    grant = await repo.insert(grant_of("p", "alice", NOW), NOW)
    claimed = await repo.claim(grant, a.id, NOW, LEASE)
    assert claimed.outcome is ClaimOutcome.CLAIMED
    assert claimed.grant is not None
    assert (await repo.claim(claimed.grant, b.id, NOW, LEASE)).outcome is ClaimOutcome.HELD
    await nodes.stop([a.id], NOW)
    taken = await repo.claim(claimed.grant, b.id, NOW, LEASE)
    assert taken.outcome is ClaimOutcome.CLAIMED
    assert taken.took_over == a.id
    assert taken.recovering
    assert taken.grant is not None
    assert taken.grant.intent_at == claimed.grant.intent_at  # grace counts from the first


async def test_a_node_whose_heartbeat_is_stale_is_dead_and_a_fresh_one_is_alive(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """Past node_timeout without a heartbeat a node's lease is free; a heartbeat keeps it."""
    timeout = timedelta(seconds=2)
    repo = GrantRepository(engine, keyring, node_timeout=timeout)
    nodes = NodeRepository(engine, timeout)
    a, b = this_node(), this_node()
    for node in (a, b):
        await nodes.register(node, NOW)
    grant = await repo.insert(grant_of("p", "alice", NOW), NOW)
    claimed = await repo.claim(grant, a.id, NOW, timedelta(hours=1))
    assert claimed.grant is not None
    server_clock = engine.dialect.name == "postgresql"
    later = NOW + timedelta(seconds=1)
    if server_clock:
        await asyncio.sleep(1)
    assert await nodes.heartbeat(a.id, later, [], LEASE)
    assert (await repo.claim(claimed.grant, b.id, later, LEASE)).outcome is ClaimOutcome.HELD
    stale = later + timeout + timedelta(seconds=1)
    if server_clock:
        await asyncio.sleep(timeout.total_seconds() + 1)
    members = {m.info.id: m.alive for m in await nodes.members(stale)}
    assert members[a.id] is False
    taken = await repo.claim(claimed.grant, b.id, stale, LEASE)
    assert taken.outcome is ClaimOutcome.CLAIMED
    assert taken.took_over == a.id


async def test_the_heartbeat_renews_the_leases_of_calls_in_flight(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """A short lease under a call in flight never lapses while its node beats (1)."""
    repo = GrantRepository(engine, keyring)
    nodes = NodeRepository(engine, timedelta(seconds=10))
    a, b = this_node(), this_node()
    for node in (a, b):
        await nodes.register(node, NOW)
    grant = await repo.insert(grant_of("p", "alice", NOW), NOW)
    claimed = await repo.claim(grant, a.id, NOW, timedelta(seconds=1))
    assert claimed.grant is not None
    later = NOW + timedelta(seconds=5)
    if engine.dialect.name == "postgresql":
        await asyncio.sleep(1.5)  # the server's clock decides
    # Without renewal the lease has lapsed...
    assert await repo.lease_held(grant.id, later) is False
    assert await nodes.heartbeat(a.id, later, [grant.id], LEASE)
    # ...with it, it holds again, for a lease length from the beat.
    assert await repo.lease_held(grant.id, later) is True
    assert (await repo.claim(claimed.grant, b.id, later, LEASE)).outcome is ClaimOutcome.HELD


async def test_the_fleet_survey_stops_dead_nodes_of_this_machine_and_lists_live_peers(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """A survey marks stopped the nodes of this machine whose process is gone, and counts the
    live others as peers."""
    nodes = NodeRepository(engine, timedelta(seconds=30))
    dead = replace(this_node(), pid=dead_pid())
    elsewhere = replace(this_node(), hostname="elsewhere.example")
    for node in (dead, elsewhere):
        await nodes.register(node, NOW)
    fleet = Fleet(nodes, this_node(), lambda: NOW, lease=LEASE, known_wait=0)
    await fleet.join()
    assert fleet.peers == frozenset({elsewhere.id})
    assert {m.info.id for m in await nodes.members(NOW)} == {elsewhere.id, fleet.me.id}
    assert fleet.problem(timedelta(seconds=10)) is None


async def test_a_joining_node_waits_until_its_live_peers_have_beaten_since_it_registered(
    engine: AsyncEngine,
) -> None:
    """Peers announce claims only to nodes they know of, and learn of a new one at their next
    heartbeat: a node joins (and so serves) only once every live peer has beaten since."""
    nodes = NodeRepository(engine, timedelta(seconds=30))
    peer = replace(this_node(), hostname="elsewhere.example")
    await nodes.register(peer, datetime.now(UTC))
    fleet = Fleet(nodes, this_node(), lambda: datetime.now(UTC), lease=LEASE)
    joining = Tasks().spawn(fleet.join(), "join")
    await asyncio.sleep(0.5)
    assert not joining.done()
    assert fleet.peers == frozenset({peer.id})
    assert await nodes.heartbeat(peer.id, datetime.now(UTC), [], LEASE)
    await asyncio.wait_for(joining, 2)


async def test_claims_respect_max_concurrency_across_brokers(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """Two brokers claiming a backlog of one provider never hold more than its capacity of
    leases between them, and neither takes a grant the other claimed (1, 6)."""
    repo_a, repo_b = GrantRepository(engine, keyring), GrantRepository(engine, keyring)
    nodes = NodeRepository(engine, timedelta(seconds=30))
    a, b = this_node(), this_node()
    for node in (a, b):
        await nodes.register(node, NOW)
    # Due an hour ago by any clock (PostgreSQL compares with its own).
    due = datetime.now(UTC) - timedelta(hours=1)
    for i in range(10):
        await repo_a.insert(grant_of("p", f"u{i}", due), NOW)
    await repo_a.insert(grant_of("q", "other", due), NOW)
    first = await repo_a.claim_due("p", a.id, NOW, LEASE, capacity=4, limit=3)
    second = await repo_b.claim_due("p", b.id, NOW, LEASE, capacity=4, limit=3)
    assert len(first) == 3
    assert len(second) == 1  # 4 in flight: the provider's capacity
    ids = [c.grant.id for c in first + second if c.grant is not None]
    assert len(set(ids)) == 4
    assert await repo_b.claim_due("p", b.id, NOW, LEASE, capacity=4, limit=3) == []
    assert len(await repo_b.claim_due("q", b.id, NOW, LEASE, capacity=4, limit=3)) == 1


async def test_chosen_grants_are_claimed_in_the_order_given_within_the_room(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """`claim_ids` takes the caller's grants in the caller's order as far as the provider's
    room goes, tells which it tried, and never a grant of another provider."""
    repo = GrantRepository(engine, keyring)
    node = this_node()
    await NodeRepository(engine, timedelta(seconds=30)).register(node, NOW)
    due = datetime.now(UTC) - timedelta(hours=1)
    mine = [(await repo.insert(grant_of("p", f"u{i}", due), NOW)).id for i in range(6)]
    other = (await repo.insert(grant_of("q", "other", due), NOW)).id
    chosen = [mine[4], other, mine[1], mine[3], mine[0]]
    batch = await repo.claim_ids("p", node.id, NOW, LEASE, capacity=4, ids=chosen)
    assert [c.grant.id for c in batch.claims if c.grant is not None] == [mine[4], mine[1], mine[3]]
    assert batch.tried == frozenset(chosen[:4])
    assert not await repo.lease_held(other, NOW)


async def test_a_claim_batch_reads_neither_the_backlog_nor_the_provider_whole(
    tmp_path: Path, keyring: Keyring
) -> None:
    """Each claim batch counts the provider's live leases and reads the grants it was given:
    on SQLite by the lease_owner index and the primary key, not by walking every grant of the
    provider, which a backlog of thousands made cost more than the refresh itself."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    try:
        await upgrade(engine)
        repo = GrantRepository(engine, keyring)
        node = this_node()
        await NodeRepository(engine, timedelta(seconds=30)).register(node, NOW)
        due = NOW - timedelta(hours=1)
        await repo.store_many([grant_of("p", f"u{i:03d}", due) for i in range(200)], [], NOW)
        ids = sorted(grant.id for grant in await repo.all())
        await repo.claim_ids("p", node.id, NOW, LEASE, capacity=8, ids=ids[:3])  # live leases
        statements: list[tuple[str, Any]] = []

        def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "grants" in statement:
                statements.append((statement, parameters))

        event.listen(engine.sync_engine, "before_cursor_execute", record)
        batch = await repo.claim_ids("p", node.id, NOW, LEASE, capacity=8, ids=ids[100:110])
        event.remove(engine.sync_engine, "before_cursor_execute", record)
        assert len(batch.claims) == 5
        assert len(statements) >= 2  # the count of live leases and the claim's read
        async with engine.connect() as conn:
            for statement, parameters in statements:
                plan = [
                    row.detail
                    for row in await conn.exec_driver_sql(
                        f"EXPLAIN QUERY PLAN {statement}", parameters
                    )
                ]
                assert not [step for step in plan if "SCAN grants" in step], (statement, plan)
                assert not [step for step in plan if "(provider=?" in step], (statement, plan)
    finally:
        await engine.dispose()


async def test_after_an_outage_no_lease_is_taken_by_time_until_the_node_has_beaten_a_while(
    engine: AsyncEngine, keyring: Keyring
) -> None:
    """When the store was down, every heartbeat is stale and leases may have lapsed: a broker
    that has not reached the store for a whole node_timeout takes no lease by time (the owner
    may be alive and about to commit), only leases of nodes marked stopped (7, 9)."""
    timeout = timedelta(seconds=2)
    repo = GrantRepository(engine, keyring, node_timeout=timeout)
    nodes = NodeRepository(engine, timeout)
    a, b, c = this_node(), this_node(), this_node()
    for node in (a, b, c):
        await nodes.register(node, NOW)
    alice = await repo.insert(grant_of("p", "alice", NOW), NOW)
    bob = await repo.insert(grant_of("p", "bob", NOW), NOW)
    lapsed = await repo.claim(alice, a.id, NOW, timedelta(seconds=1))
    silent = await repo.claim(bob, c.id, NOW, timedelta(hours=1))
    assert lapsed.grant is not None
    assert silent.grant is not None
    stale = NOW + timeout + timedelta(seconds=2)
    if engine.dialect.name == "postgresql":
        await asyncio.sleep(timeout.total_seconds() + 1)
    repo.judging = lambda: False
    assert (await repo.claim(lapsed.grant, b.id, stale, LEASE)).outcome is ClaimOutcome.HELD
    assert (await repo.claim(silent.grant, b.id, stale, LEASE)).outcome is ClaimOutcome.HELD
    await nodes.stop([c.id], stale)
    assert (await repo.claim(silent.grant, b.id, stale, LEASE)).outcome is ClaimOutcome.CLAIMED
    repo.judging = lambda: True
    assert (await repo.claim(lapsed.grant, b.id, stale, LEASE)).outcome is ClaimOutcome.CLAIMED


async def test_a_node_judges_others_only_after_reaching_the_store_for_a_node_timeout(
    engine: AsyncEngine,
) -> None:
    """Judging needs a node_timeout of unbroken heartbeats since joining (or since the last
    failed one)."""
    nodes = NodeRepository(engine, timedelta(seconds=0.3))
    fleet = Fleet(nodes, this_node(), lambda: NOW, lease=LEASE)
    assert not fleet.judging()
    await fleet.join()
    assert not fleet.judging()
    await asyncio.sleep(0.35)
    assert fleet.judging()
    fleet.steady_since = None  # what a failed heartbeat does
    assert not fleet.judging()
