"""The refresher against a model strict-rotation IdP and a real SQLite store.

Each test names the ROTATION.md invariant it proves. The model IdP (tests/model_idp.py) records
every presentation of a spent refresh token outside its grace as a violation; every test that
refreshes ends by asserting there were none.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.crypto import Keyring
from broker.errors import ReauthRequired, StoreUnavailable, TokenUnavailable
from broker.grants import Import
from broker.model import Grant, GrantState, GrantSummary, Secret, TokenSet
from broker.refresher import LEASE
from broker.schedule import ROTATION_LOST, RefreshPolicy, backoff
from broker.store.engine import create_engine
from broker.store.nodes import NodeInfo
from broker.store.repository import DueGrant, GrantRepository
from broker.store.rotations import Claim, ClaimBatch, ClaimOutcome
from broker.tasks import Tasks
from tests.model_idp import (
    ACCESS_LIFETIME,
    PROVIDER,
    RETRY_AFTER,
    Fault,
    HandClock,
    Incarnation,
    Killed,
    ModelIdp,
    dead_node,
    dead_owner,
    node_owner,
)

GRACE = timedelta(seconds=30)
POLICY = RefreshPolicy()
# With rand = 0.5 and the default policy, a fresh 600 s token comes due at 427.5 s.
DUE = 430


# -- fixtures and helpers -----------------------------------------------------------------------


def broker(
    repo: GrantRepository,
    idp: ModelIdp,
    clock: HandClock,
    *,
    node: NodeInfo | None = None,
    max_concurrency: int = 8,
) -> Incarnation:
    """A broker process over `repo`, talking to `idp`, with the IdP's grace configured."""
    return Incarnation.build(
        repo, idp, clock, grace=idp.grace, node=node, max_concurrency=max_concurrency
    )


Pair = tuple[Incarnation, Incarnation]


@pytest.fixture
async def pair(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock, db_path: Path, keyring: Keyring
) -> AsyncIterator[Pair]:
    """Two broker processes on one store, each with its own engine; alice logged in via the
    first, and the second started after that."""
    other_engine = create_engine(f"sqlite:///{db_path}")
    try:
        a = broker(repo, idp, clock)
        b = broker(GrantRepository(other_engine, keyring), idp, clock)
        await a.login(idp, "alice", clock())
        await b.start()
        yield a, b
    finally:
        await other_engine.dispose()


async def until(condition: Callable[[], bool | Awaitable[bool]], within: float = 5.0) -> None:
    """Wait (in real time) until `condition` holds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < deadline, "timed out waiting for a condition"
        await asyncio.sleep(0.005)


def results(idp: ModelIdp) -> list[str]:
    """How each call to the model ended, in order."""
    return [call.result for call in idp.calls]


def family_chain(idp: ModelIdp, grant: Grant) -> list[str]:
    """The refresh tokens of the grant's family at the model, oldest first."""
    assert grant.tokens.refresh_token is not None
    family = idp.family_of(grant.tokens.refresh_token)
    assert family is not None
    return family.chain


def revealed(secret: Secret | None) -> str | None:
    """A secret's value, for comparing with the model's records."""
    return None if secret is None else secret.reveal()


# -- invariant 1: one refresh in flight per grant ----------------------------------------------


async def test_fifty_waiters_share_one_idp_call(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """Fifty callers of an expired grant wait on one refresh: one IdP call, one new token (1)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(ACCESS_LIFETIME + 1)
    idp.gate = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        waiters = [group.create_task(b.service.token(PROVIDER, "alice")) for _ in range(50)]
        await until(lambda: idp.in_flight == 1)
        await asyncio.sleep(0.05)  # every waiter has had its chance to start another call
        assert idp.in_flight == 1
        idp.gate.set()
    served = {revealed(waiter.result().tokens.access_token) for waiter in waiters}
    assert results(idp) == ["rotated"]
    stored = await b.stored("alice")
    assert served == {revealed(stored.tokens.access_token)}
    assert stored.generation == grant.generation + 1
    assert revealed(stored.tokens.refresh_token) == family_chain(idp, grant)[-1]
    assert idp.violations == []


async def test_a_cancelled_waiter_does_not_cancel_the_refresh(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A caller that gives up leaves the IdP call running, and its result is committed (1, 2)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(ACCESS_LIFETIME + 1)
    idp.gate = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        waiter = group.create_task(b.service.token(PROVIDER, "alice"))
        await until(lambda: idp.in_flight == 1)
        in_flight = b.refresher.refresh(grant)  # single flight: the task the waiter awaits
        waiter.cancel()
        await asyncio.sleep(0.01)
        assert waiter.cancelled()
        assert not in_flight.done()
        idp.gate.set()
    refreshed = await in_flight
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1
    assert await b.stored("alice") == refreshed
    assert results(idp) == ["rotated"]
    assert idp.violations == []


async def test_two_owners_racing_on_one_grant_make_one_idp_call(
    pair: Pair, idp: ModelIdp, clock: HandClock
) -> None:
    """Two processes refreshing one grant at once spend its refresh token once (1, leases)."""
    a, b = pair
    clock.advance(DUE)
    idp.gate = asyncio.Event()
    spawner = Tasks()
    tasks = [
        spawner.spawn(a.refresher.wait(a.cached("alice"), 5), "refresh on a"),
        spawner.spawn(b.refresher.wait(b.cached("alice"), 5), "refresh on b"),
    ]
    await until(lambda: idp.in_flight == 1)
    await asyncio.sleep(0.1)  # the loser has claimed, failed, and is waiting for the winner
    assert idp.in_flight == 1
    idp.gate.set()
    refreshed = await asyncio.gather(*tasks)
    assert results(idp) == ["rotated"]
    stored = await a.stored("alice")
    assert stored.generation == 2
    assert [grant.generation if grant else None for grant in refreshed] == [2, 2]
    assert a.cached("alice") == b.cached("alice") == stored
    assert await b.repository.lease_owners() == set()
    assert idp.violations == []


async def test_a_caller_on_the_losing_process_gets_the_token_the_winner_commits(
    pair: Pair, idp: ModelIdp, clock: HandClock
) -> None:
    """A caller whose process lost the lease race is served the winner's new token (1, 6)."""
    a, b = pair
    clock.advance(ACCESS_LIFETIME + 1)  # expired: both processes' callers must wait
    idp.gate = asyncio.Event()
    winner = a.refresher.refresh(a.cached("alice"))
    await until(lambda: idp.in_flight == 1)
    async with asyncio.TaskGroup() as group:
        caller = group.create_task(b.service.token(PROVIDER, "alice"))
        await asyncio.sleep(0.05)
        idp.gate.set()
    committed = await winner
    assert committed is not None
    assert caller.result().tokens.access_token == committed.tokens.access_token


async def test_an_owner_arriving_just_after_the_winner_commits_does_not_refresh_again(
    pair: Pair, idp: ModelIdp, clock: HandClock
) -> None:
    """A process whose cache is one generation behind picks up the new one instead of rotating."""
    a, b = pair
    clock.advance(ACCESS_LIFETIME + 1)
    committed = await a.refresher.refresh(a.cached("alice"))
    assert committed is not None
    # B's schedule loop has not synced yet; a caller on B finds the expired generation.
    served = await b.service.token(PROVIDER, "alice")
    assert results(idp) == ["rotated"]
    assert served.generation == committed.generation
    assert idp.violations == []


OTHER_OWNERS: dict[str, dict[str, Any]] = {
    # The same host name and pid in another container, or on another host: not judged by pid.
    "same-name-other-container": {"pid_namespace": "pid:[4026531000]", "pid": 999_999},
    "same-name-other-boot": {"boot_id": "00000000-0000-0000-0000-000000000000", "pid": 999_999},
    "other-host": {"hostname": "elsewhere.example", "pid": 4242},
    "live-pid-here": {"pid": os.getppid()},
}


@pytest.mark.parametrize("where", OTHER_OWNERS.values(), ids=OTHER_OWNERS)
async def test_a_live_lease_of_another_owner_blocks_the_refresh(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock, where: dict[str, Any]
) -> None:
    """A lease held by a live owner (or one whose pid cannot be judged from here: hostnames and
    pids repeat across containers) is neither broken nor overridden until it expires, and a
    refresh asked for meanwhile sends nothing and holds no slot (1, 9)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    owner = await node_owner(repo, **where)
    assert await repo.take_lease(grant.id, owner, clock(), LEASE)
    await b.refresher.recover()
    assert await repo.lease_owners() == {owner}
    assert await repo.due(clock(), 10, [PROVIDER]) == []
    held = await asyncio.wait_for(b.refresher.refresh(grant), 5)
    assert held is not None
    assert held.generation == grant.generation
    assert idp.calls == []
    clock.advance(LEASE + timedelta(seconds=1))  # the owner never came back: its lease lapses
    refreshed = await b.refresher.refresh(grant)
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1
    assert results(idp) == ["rotated"]


async def test_recover_breaks_the_lease_of_a_dead_process_on_this_host(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A restarted broker does not wait out its dead predecessor's leases (1, 7)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    dead = await dead_owner(repo)
    assert await repo.take_lease(grant.id, dead, clock(), LEASE)
    assert await b.refresher.recover() == 0  # no intent: nothing to finish
    assert await repo.lease_owners() == set()
    refreshed = await b.refresher.refresh(grant)
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1


async def test_due_lists_grants_with_an_open_intent_once_their_lease_is_gone(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A grant whose refresh outcome is unknown is due at once, but never under a live lease (4)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    assert grant.next_refresh_at is not None
    assert grant.next_refresh_at > clock()
    assert await repo.due(clock(), 10, [PROVIDER]) == []
    dead = await dead_owner(repo)
    claimed = await repo.claim(grant, dead, clock(), LEASE)
    assert claimed.outcome is ClaimOutcome.CLAIMED
    assert await repo.due(clock(), 10, [PROVIDER]) == []  # the lease still looks live
    claimed_at = clock()
    expired = clock() + LEASE + timedelta(seconds=1)
    # The claim made it due at the claim's time, should the refresh be cut short.
    assert await repo.due(expired, 10, [PROVIDER]) == [DueGrant(grant.id, PROVIDER, claimed_at)]
    await b.fleet.survey()  # finds the dead node on this machine and marks it stopped
    assert [due.id for due in await repo.due(clock(), 10, [PROVIDER])] == [grant.id]
    assert (await b.stored("alice")).intent_at == clock()


# -- invariants 3, 4, 7: unknown outcomes ---------------------------------------------------------


async def test_ambiguous_inside_grace_replays_and_commits_the_same_pair(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """An ambiguous refresh is replayed inside grace and stores the pair the IdP minted (3, 4)."""
    idp.grace = GRACE
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.AMBIGUOUS_AFTER)
    refreshed = await b.refresher.refresh(grant)
    assert results(idp) == ["ambiguous_after", "replayed"]
    chain = family_chain(idp, grant)
    assert len(chain) == 2  # rotated once; the replay minted nothing
    stored = await b.stored("alice")
    assert refreshed == stored
    assert stored.generation == grant.generation + 1
    assert revealed(stored.tokens.refresh_token) == chain[-1]
    assert stored.tokens.access_token is not None
    assert idp.is_valid(stored.tokens.access_token, clock())
    assert stored.intent_at is None
    assert await repo.lease_owners() == set()
    assert b.count("rotation_recoveries", "recovered") == 1
    assert b.count("rotation_recoveries", "lost") == 0
    assert b.count("refresh", "ambiguous") == 1
    assert b.count("refresh", "success") == 1
    assert idp.violations == []


async def test_ambiguous_without_grace_is_rotation_lost(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """Without grace an ambiguous refresh is never replayed: reauth, rotation_lost (3, 4)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.AMBIGUOUS_AFTER)
    lost = await b.refresher.refresh(grant)
    assert results(idp) == ["ambiguous_after"]
    stored = await b.stored("alice")
    assert lost == stored
    assert stored.state is GrantState.REAUTH_REQUIRED
    assert stored.last_error is not None
    assert stored.last_error.startswith(ROTATION_LOST)
    assert stored.generation == grant.generation
    assert stored.tokens == grant.tokens  # nothing deleted, nothing invented
    assert b.count("rotation_recoveries", "lost") == 1
    assert b.count("rotation_recoveries", "recovered") == 0
    assert await repo.due(clock() + timedelta(days=1), 10, [PROVIDER]) == []
    with pytest.raises(ReauthRequired, match=ROTATION_LOST):
        await b.service.token(PROVIDER, "alice")
    assert idp.violations == []


async def test_persistent_ambiguity_replays_only_until_grace_ends(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A refresh that stays ambiguous is replayed while grace lasts, then given up: no loop (4)."""
    idp.grace = GRACE
    idp.latency = timedelta(seconds=14)  # every call times out after 14 s of the test's time
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    start = clock()
    idp.sticky = Fault.AMBIGUOUS_AFTER
    lost = await b.refresher.refresh(grant)
    # Sent at 0 s, 14 s and 28 s; the third answer (at 42 s) is past grace: given up.
    assert [call.at - start for call in idp.calls] == [timedelta(seconds=s) for s in (0, 14, 28)]
    assert results(idp) == ["ambiguous_after"] * 3
    assert lost is not None
    assert lost.state is GrantState.REAUTH_REQUIRED
    assert lost.last_error is not None
    assert lost.last_error.startswith(ROTATION_LOST)
    assert b.count("rotation_recoveries", "lost") == 1
    assert b.count("refresh", "ambiguous") == 3
    assert idp.violations == []


class SlowIntentRepository(GrantRepository):
    """A repository whose intent write takes 20 s of the test's clock (a store under load)."""

    def __init__(self, engine: AsyncEngine, keyring: Keyring, clock: HandClock) -> None:
        super().__init__(engine, keyring)
        self.clock = clock

    async def claim(
        self,
        grant: Grant,
        owner: str,
        now: datetime,
        lease: timedelta,
        *,
        capacity: int | None = None,
    ) -> Claim:
        """Write the lease and the intent; the commit takes 20 s."""
        claimed = await super().claim(grant, owner, now, lease, capacity=capacity)
        self.clock.advance(20)
        return claimed


async def test_grace_is_counted_from_the_send_not_from_a_slow_intent_write(
    engine: AsyncEngine, keyring: Keyring, idp: ModelIdp, clock: HandClock
) -> None:
    """The provider's grace starts when the token leaves, so time spent writing the intent
    before the send does not shorten the replays' window; none is sent after grace (3, 4)."""
    idp.grace = GRACE
    idp.latency = timedelta(seconds=14)
    b = broker(SlowIntentRepository(engine, keyring, clock), idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    start = clock()
    idp.sticky = Fault.AMBIGUOUS_AFTER
    lost = await b.refresher.refresh(grant)
    # Sent at 20 s (after the intent's commit), replayed at 34 s and 48 s: inside the 30 s
    # of grace from the send. Counted from the intent (0 s) it would give up after one call.
    assert [call.at - start for call in idp.calls] == [timedelta(seconds=s) for s in (20, 34, 48)]
    assert lost is not None
    assert lost.state is GrantState.REAUTH_REQUIRED
    assert b.count("rotation_recoveries", "lost") == 1
    assert idp.violations == []


async def test_a_replay_is_never_sent_after_grace_has_ended(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A replay decided just inside grace is not sent once the pause before it ends grace (3)."""
    idp.grace = GRACE
    idp.latency = timedelta(seconds=29.8)  # the ambiguous answer comes 0.2 s before grace ends
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.AMBIGUOUS_AFTER)
    refreshing = b.refresher.refresh(grant)
    await until(lambda: len(idp.calls) == 1)  # answered; the replay is decided, not yet sent
    idp.latency = timedelta(0)
    clock.advance(0.5)  # the 0.5 s pause before the first replay
    await refreshing
    assert idp.violations == []


# -- invariant 5: transient is not terminal --------------------------------------------------------


async def test_terminal_refusal_needs_a_new_login(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """invalid_grant ends the grant with its reason; the tokens stay as they were (5)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.REJECTED)
    await b.refresher.refresh(grant)
    stored = await b.stored("alice")
    assert stored.state is GrantState.REAUTH_REQUIRED
    assert stored.last_error is not None
    assert "invalid_grant" in stored.last_error
    assert not stored.last_error.startswith(ROTATION_LOST)
    assert stored.tokens == grant.tokens
    assert stored.generation == grant.generation
    assert b.count("refresh", "invalid_grant") == 1
    assert b.count("rotation_recoveries", "lost") == 0
    assert idp.violations == []


async def test_after_invalid_grant_the_old_access_token_is_served_until_it_expires(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """After invalid_grant the still-valid access token is served, then 409 at expiry (5)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.REJECTED)
    await b.refresher.refresh(grant)
    served = await b.service.token(PROVIDER, "alice")
    assert served.tokens.access_token == grant.tokens.access_token
    assert served.tokens.access_token is not None
    assert idp.is_valid(served.tokens.access_token, clock())
    clock.advance(ACCESS_LIFETIME - DUE)
    with pytest.raises(ReauthRequired):
        await b.service.token(PROVIDER, "alice")
    assert len(idp.calls) == 1


async def test_after_invalid_grant_asking_more_life_than_is_left_is_told_to_log_in(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """No refresh can give a refused grant more life: a caller's min_ttl beyond what its token
    has left is a 409, while callers asking less are still served (5)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.REJECTED)
    await b.refresher.refresh(grant)
    left = ACCESS_LIFETIME - DUE
    served = await b.service.token(PROVIDER, "alice", min_ttl=left - 60)
    assert served.tokens.access_token == grant.tokens.access_token
    with pytest.raises(ReauthRequired, match="needs a new login"):
        await b.service.token(PROVIDER, "alice", min_ttl=left + 60)
    assert len(idp.calls) == 1


async def test_right_after_an_import_a_callers_min_ttl_refreshes_at_once(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """An imported access token was issued elsewhere, when is not known: a caller asking for
    more life than it has gets it refreshed at once; the token that refresh issued is not
    refreshed again for the next caller asking the same."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())  # an import, as `token-broker import` does
    clock.advance(1)
    served = await b.service.token(PROVIDER, "alice", min_ttl=ACCESS_LIFETIME)
    assert served.generation == grant.generation + 1
    assert len(idp.calls) == 1
    clock.advance(1)
    again = await b.service.token(PROVIDER, "alice", min_ttl=ACCESS_LIFETIME)
    assert again.generation == served.generation
    assert len(idp.calls) == 1
    assert idp.violations == []


@pytest.mark.parametrize("fault", [Fault.UNREACHABLE, Fault.TRANSIENT_OAUTH])
async def test_transient_failures_back_off_and_keep_every_token(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock, fault: Fault
) -> None:
    """Transient failures back off exponentially and change no token and no state (5)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    for failures in (1, 2):
        idp.fail_next(fault)
        settled = await b.refresher.refresh(b.cached("alice"))
        stored = await b.stored("alice")
        assert settled == stored
        assert stored.state is GrantState.ACTIVE
        assert stored.tokens == grant.tokens
        assert stored.generation == grant.generation
        assert stored.refresh_failures == failures
        assert stored.next_refresh_at == clock() + backoff(failures, POLICY, 0.5)
        assert stored.last_error
        assert stored.intent_at is None
        assert grant.tokens.refresh_token is not None
        assert idp.is_live(grant.tokens.refresh_token, clock())
        # The valid access token keeps being served, and callers do not hammer the IdP.
        served = await b.service.token(PROVIDER, "alice", min_ttl=ACCESS_LIFETIME)
        assert served.tokens.access_token == grant.tokens.access_token
        assert len(idp.calls) == failures
        assert stored.next_refresh_at is not None
        clock.now = stored.next_refresh_at
    assert b.count("refresh", "transient_error") == 2
    refreshed = await b.refresher.refresh(b.cached("alice"))
    assert refreshed is not None
    assert refreshed.refresh_failures == 0
    assert refreshed.generation == grant.generation + 1
    assert refreshed.last_error is None
    assert idp.violations == []


async def test_retry_after_is_honoured(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A 429's Retry-After sets the next attempt, and callers are told to come back then (5)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(ACCESS_LIFETIME)  # expired: the caller waits for a refresh, which is refused
    idp.fail_next(Fault.RATE_LIMITED)
    with pytest.raises(TokenUnavailable) as refused:
        await b.service.token(PROVIDER, "alice")
    assert refused.value.retry_after == RETRY_AFTER
    stored = await b.stored("alice")
    assert stored.next_refresh_at == clock() + timedelta(seconds=RETRY_AFTER)
    assert stored.tokens == grant.tokens
    with pytest.raises(TokenUnavailable):  # in back-off: no second call
        await b.service.token(PROVIDER, "alice")
    assert len(idp.calls) == 1


async def test_a_response_without_refresh_token_is_served_until_expiry_then_needs_login(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A rotating IdP that sends no new refresh token leaves a grant that lives out its token."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.NO_REFRESH_TOKEN)
    refreshed = await b.refresher.refresh(grant)
    assert refreshed is not None
    assert refreshed.state is GrantState.ACTIVE
    assert refreshed.tokens.refresh_token is None  # the spent one is not kept
    assert refreshed.next_refresh_at is None
    assert refreshed == await b.stored("alice")
    served = await b.service.token(PROVIDER, "alice")
    assert served.tokens.access_token == refreshed.tokens.access_token
    assert await repo.due(clock() + timedelta(days=1), 10, [PROVIDER]) == []
    clock.advance(ACCESS_LIFETIME)
    with pytest.raises(ReauthRequired):
        await b.service.token(PROVIDER, "alice")
    assert GrantSummary.of(refreshed, clock()).state is GrantState.REAUTH_REQUIRED
    assert len(idp.calls) == 1
    assert idp.violations == []


async def test_a_response_without_access_token_still_stores_the_new_refresh_token(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """When the IdP rotated but sent no usable access token, its new refresh token is kept (2)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.NO_ACCESS_TOKEN)
    refreshed = await b.refresher.refresh(grant)
    assert refreshed is not None
    assert revealed(refreshed.tokens.refresh_token) == family_chain(idp, grant)[-1]
    assert refreshed.tokens.access_token == grant.tokens.access_token
    assert refreshed.last_error
    assert refreshed == await b.stored("alice")
    assert idp.violations == []


async def test_a_response_without_access_token_backs_off_instead_of_rotating_again(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A refresh that yields no usable access token is retried after a back-off, not at once."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.NO_ACCESS_TOKEN)
    refreshed = await b.refresher.refresh(grant)
    assert refreshed is not None
    assert refreshed.next_refresh_at is not None
    assert refreshed.next_refresh_at > clock()


# -- invariant 7: crash anywhere ------------------------------------------------------------------


async def kill_mid_refresh(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock, fault: Fault
) -> Grant:
    """Log in, come due, and die during the refresh; the grant as the store keeps it."""
    dead = broker(repo, idp, clock, node=dead_node())
    grant = await dead.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(fault)
    with pytest.raises(Killed):
        await dead.refresher.refresh(grant)
    stored = await dead.stored("alice")
    assert stored.intent_at == clock()  # written, durably, before the send
    assert stored.generation == grant.generation
    assert await repo.lease_owners() == {dead.refresher.owner}
    return grant


async def test_recover_after_a_kill_inside_grace_finishes_with_the_same_pair(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A broker killed after the IdP rotated replays on restart and keeps the minted pair (7)."""
    idp.grace = GRACE
    grant = await kill_mid_refresh(repo, idp, clock, Fault.KILL_AFTER)
    clock.advance(10)  # the restart takes 10 s
    b = broker(repo, idp, clock)
    assert await b.start() == 1
    recovered = await b.refresher.refresh(b.cached("alice"))  # the recovery in flight
    assert results(idp) == ["kill_after", "replayed"]
    chain = family_chain(idp, grant)
    assert len(chain) == 2
    assert recovered is not None
    assert recovered == await b.stored("alice")
    assert recovered.generation == grant.generation + 1
    assert revealed(recovered.tokens.refresh_token) == chain[-1]
    assert recovered.intent_at is None
    assert b.count("rotation_recoveries", "recovered") == 1
    assert idp.violations == []


@pytest.mark.parametrize(("grace", "downtime"), [(GRACE, 30), (GRACE, 3600), (timedelta(0), 0)])
async def test_recover_after_grace_is_rotation_lost_without_presenting_the_spent_token(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock, grace: timedelta, downtime: int
) -> None:
    """Restarting after grace (or with none) marks rotation_lost and never replays (3, 7)."""
    idp.grace = grace
    grant = await kill_mid_refresh(repo, idp, clock, Fault.KILL_AFTER)
    clock.advance(downtime)
    b = broker(repo, idp, clock)
    assert await b.start() == 1
    lost = await b.refresher.refresh(b.cached("alice"))
    assert results(idp) == ["kill_after"]
    assert lost is not None
    assert lost.state is GrantState.REAUTH_REQUIRED
    assert lost.last_error is not None
    assert lost.last_error.startswith(ROTATION_LOST)
    assert lost.tokens == grant.tokens
    assert b.count("rotation_recoveries", "lost") == 1
    assert idp.violations == []


async def test_recover_after_a_kill_before_the_send_rotates_normally(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A broker killed before its request left finishes the refresh on restart, inside grace (7)."""
    idp.grace = GRACE
    grant = await kill_mid_refresh(repo, idp, clock, Fault.KILL_BEFORE)
    b = broker(repo, idp, clock)
    assert await b.start() == 1
    recovered = await b.refresher.refresh(b.cached("alice"))
    assert results(idp) == ["kill_before", "rotated"]
    assert recovered is not None
    assert recovered.generation == grant.generation + 1
    assert b.count("rotation_recoveries", "recovered") == 1
    assert idp.violations == []


async def test_a_replayed_pair_is_never_served_past_its_real_expiry(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A pair recovered by a replay is dated from the first send, so it is never served expired."""
    idp.grace = GRACE
    await kill_mid_refresh(repo, idp, clock, Fault.KILL_AFTER)
    clock.advance(25)  # django-oauth-toolkit re-sends the full expires_in on the replay
    b = broker(repo, idp, clock)
    await b.start()
    recovered = await b.refresher.refresh(b.cached("alice"))
    assert results(idp) == ["kill_after", "replayed"]
    assert recovered is not None
    assert recovered.tokens.access_token is not None
    real_expiry = idp.expires_at(recovered.tokens.access_token)
    assert recovered.access_expires_at is not None
    assert recovered.access_expires_at <= real_expiry
    idp.sticky = Fault.UNREACHABLE  # the IdP is down when the token nears its end
    clock.now = real_expiry - timedelta(seconds=1)
    served = await b.service.token(PROVIDER, "alice")
    assert served.tokens.access_token == recovered.tokens.access_token
    assert idp.is_valid(recovered.tokens.access_token, clock())
    clock.now = real_expiry
    with pytest.raises(TokenUnavailable):
        await b.service.token(PROVIDER, "alice")
    assert idp.violations == []


async def test_a_running_broker_finishes_the_refresh_of_a_sibling_that_died_on_this_host(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock, db_path: Path, keyring: Keyring
) -> None:
    """When one of two brokers on a host dies mid-refresh, the other recovers it in grace (7)."""
    idp.grace = GRACE
    other_engine = create_engine(f"sqlite:///{db_path}")
    try:
        survivor = broker(repo, idp, clock)
        dead = broker(GrantRepository(other_engine, keyring), idp, clock, node=dead_node())
        await survivor.login(idp, "alice", clock())
        await dead.start()
        clock.advance(DUE)
        idp.fail_next(Fault.KILL_AFTER)
        with pytest.raises(Killed):
            await dead.refresher.refresh(dead.cached("alice"))
        clock.advance(5)
        recovering = survivor.refresher.refresh(survivor.cached("alice"))
        finished, _ = await asyncio.wait({recovering}, timeout=1)
        clock.advance(LEASE)  # let a wait on the dead process's lease end, whatever happened
        await asyncio.wait_for(recovering, 5)
        assert finished, "the survivor waited on the lease of a dead process"
        assert results(idp) == ["kill_after", "replayed"]
        assert (await survivor.stored("alice")).generation == 2
    finally:
        await other_engine.dispose()


async def test_a_slow_answer_is_dated_from_the_send(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A pair is dated from when its request left, so a slow answer never outlives its token (5)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.latency = timedelta(seconds=20)  # the IdP answers after 20 s (the read timeout is 20 s)
    refreshed = await b.refresher.refresh(grant)
    assert refreshed is not None
    assert refreshed.tokens.access_token is not None
    assert refreshed.access_expires_at is not None
    assert refreshed.access_expires_at <= idp.expires_at(refreshed.tokens.access_token)


# -- two processes on one store -----------------------------------------------------------------


async def test_a_process_respects_the_back_off_another_process_just_stored(
    pair: Pair, idp: ModelIdp, clock: HandClock
) -> None:
    """After one process's transient failure, another whose cache predates it does not call the
    IdP before the back-off: it publishes what the store holds instead (5)."""
    a, b = pair
    clock.advance(DUE)
    idp.fail_next(Fault.UNREACHABLE)
    backing_off = await a.refresher.refresh(a.cached("alice"))
    assert backing_off is not None
    assert backing_off.next_refresh_at is not None
    assert backing_off.next_refresh_at > clock()
    seen_by_b = await b.refresher.refresh(b.cached("alice"))  # its cache predates A's failure
    assert results(idp) == ["unreachable"]
    assert seen_by_b == backing_off
    assert b.cached("alice") == backing_off
    # Once the back-off has passed, B refreshes as usual.
    clock.advance((backing_off.next_refresh_at - clock()).total_seconds() + 1)
    refreshed = await b.refresher.refresh(b.cached("alice"))
    assert refreshed is not None
    assert refreshed.generation == backing_off.generation + 1
    assert results(idp) == ["unreachable", "rotated"]
    assert idp.violations == []


# -- fencing a refresh that lost its row -----------------------------------------------------------


async def test_a_caller_waiting_on_a_refresh_overtaken_by_a_new_login_gets_the_new_token(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """When a login replaces a grant mid-refresh, the refresh is fenced off and callers served."""
    b = broker(repo, idp, clock)
    await b.login(idp, "alice", clock())
    clock.advance(ACCESS_LIFETIME + 1)
    idp.gate = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        caller = group.create_task(b.service.token(PROVIDER, "alice"))
        await until(lambda: idp.in_flight == 1)
        relogin = idp.login()
        assert relogin.refresh_token is not None
        await b.service.import_grant(
            Import(
                PROVIDER,
                "alice",
                relogin.refresh_token,
                relogin.access_token,
                relogin.expires_in,
                force=True,
            ),
            clock(),
        )
        idp.gate.set()
    assert caller.result().tokens.access_token == relogin.access_token
    assert (await b.stored("alice")).tokens.refresh_token == relogin.refresh_token


# -- invariant 6: the schedule loop ---------------------------------------------------------------


async def test_the_schedule_loop_refreshes_a_grant_when_it_comes_due(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """The loop leaves a grant alone until its due time, then refreshes it ahead of expiry (6)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    b.refresher.start()
    try:
        await asyncio.sleep(0.05)
        clock.advance(DUE - 10)
        b.refresher.poke()
        await asyncio.sleep(0.05)
        assert idp.calls == []
        clock.advance(10)
        b.refresher.poke()
        await until(lambda: len(idp.calls) == 1)

        async def committed() -> bool:
            return (await b.stored("alice")).generation == grant.generation + 1

        await until(committed)
        assert b.cached("alice").generation == grant.generation + 1
        assert b.refresher.stalled() is None
    finally:
        await b.refresher.stop()
    assert results(idp) == ["rotated"]
    assert idp.violations == []


class SlowClaims(GrantRepository):
    """The real repository, with batch claims that wait until the test lets them through (a
    store slow to answer)."""

    def __init__(self, engine: AsyncEngine, keyring: Keyring) -> None:
        super().__init__(engine, keyring)
        self.entered = asyncio.Event()
        self.proceed = asyncio.Event()

    async def claim_ids(self, *args: Any, **kwargs: Any) -> ClaimBatch:
        """Claim once the test says so."""
        self.entered.set()
        await self.proceed.wait()
        return await super().claim_ids(*args, **kwargs)


async def test_a_caller_asking_while_the_schedule_claims_shares_the_schedules_refresh(
    engine: AsyncEngine, keyring: Keyring, idp: ModelIdp, clock: HandClock
) -> None:
    """A caller needing the grant while the schedule loop's batch claim is on its way to the
    store joins that refresh: the grant is claimed and sent once, never twice by one
    process (1)."""
    repo = SlowClaims(engine, keyring)
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.gate = asyncio.Event()  # calls wait at the provider until the test opens it
    b.refresher.start()
    try:
        await asyncio.wait_for(repo.entered.wait(), 5)
        caller = b.refresher.refresh(b.cached("alice"))
        await asyncio.sleep(0.05)  # time for a claim of the caller's own to reach the store
        repo.proceed.set()
        await until(lambda: idp.in_flight >= 1)
        await asyncio.sleep(0.05)  # time for a second call to reach the provider
        assert idp.in_flight == 1
        idp.gate.set()
        refreshed = await asyncio.wait_for(caller, 5)
        assert refreshed is not None
        assert refreshed.generation == grant.generation + 1
        await asyncio.sleep(0.1)
    finally:
        await b.refresher.stop()
    assert results(idp) == ["rotated"]
    assert idp.violations == []
    assert (await b.stored("alice")).generation == grant.generation + 1
    # No second attempt took the first one's intent for an interrupted refresh.
    assert b.count("rotation_recoveries", "lost") == 0
    assert b.count("rotation_recoveries", "recovered") == 0


class DownForClaims(GrantRepository):
    """The real repository, whose batch claims fail while `down`: as a stopped database
    makes them, or with the `error` given (an unexpected one)."""

    def __init__(
        self,
        engine: AsyncEngine,
        keyring: Keyring,
        error: Exception | None = None,
    ) -> None:
        super().__init__(engine, keyring)
        self.down = True
        self.attempts = 0
        self.error = error or StoreUnavailable(
            "the database cannot be reached: ConnectionRefusedError"
        )

    async def claim_ids(self, *args: Any, **kwargs: Any) -> ClaimBatch:
        """Fail while down."""
        self.attempts += 1
        if self.down:
            raise self.error
        return await super().claim_ids(*args, **kwargs)


async def refreshed_once(repo: GrantRepository, grants: list[Grant]) -> bool:
    """Whether every grant in the store is one generation past these."""
    return all(g.generation == grants[0].generation + 1 for g in await repo.all())


async def test_while_the_store_is_down_the_loop_retries_once_a_second_and_then_refreshes(
    engine: AsyncEngine, keyring: Keyring, idp: ModelIdp, clock: HandClock
) -> None:
    """Due grants whose claim the store refuses stay due: the loop tries again about once a
    second however often it is woken, and refreshes them once the store answers (6, 7)."""
    repo = DownForClaims(engine, keyring)
    b = broker(repo, idp, clock)
    grants = [await b.login(idp, f"user{i}", clock()) for i in range(3)]
    clock.advance(DUE)
    b.refresher.start()
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.2:
            clock.advance(0.1)  # the broker's time runs ten times as fast: rechecks come due
            b.refresher.poke()  # callers and finished tasks wake the loop all the time
            await asyncio.sleep(0.01)
        assert 1 <= repo.attempts <= 4
        repo.down = False
        clock.advance(2)  # past the recheck the failed claims were put back for
        b.refresher.poke()
        await until(lambda: refreshed_once(repo, grants))
    finally:
        await b.refresher.stop()
    assert idp.violations == []


async def test_grants_whose_claim_failed_unexpectedly_stay_due(
    engine: AsyncEngine, keyring: Keyring, idp: ModelIdp, clock: HandClock
) -> None:
    """A batch claim that fails with anything, not only a store error, leaves its grants on
    the agenda: they are refreshed at the next try instead of forgotten until a restart."""
    repo = DownForClaims(engine, keyring, RuntimeError("an unexpected failure"))
    b = broker(repo, idp, clock)
    grants = [await b.login(idp, f"user{i}", clock()) for i in range(3)]
    clock.advance(DUE)
    b.refresher.start()
    try:
        await until(lambda: repo.attempts >= 1)
        repo.down = False
        clock.advance(2)  # past the recheck the failed claims were put back for
        b.refresher.poke()
        await until(lambda: refreshed_once(repo, grants))
    finally:
        await b.refresher.stop()
    assert results(idp) == ["rotated"] * 3


async def test_a_grant_whose_row_does_not_open_holds_up_no_other_and_is_tried_again(
    repo: GrantRepository, engine: AsyncEngine, idp: ModelIdp, clock: HandClock
) -> None:
    """A due grant whose sealed refresh token does not open (damaged in the store, or sealed
    with a key this process lacks) is logged and left unclaimed, nothing sent for it; the
    others of its batch are refreshed, and it is once its row opens again (6)."""
    b = broker(repo, idp, clock)
    grants = [await b.login(idp, f"user{i}", clock()) for i in range(3)]
    damaged = grants[1]
    async with engine.begin() as conn:
        sealed = (
            await conn.execute(
                text("SELECT refresh_token FROM grants WHERE id = :id"), {"id": damaged.id}
            )
        ).scalar_one()
        flipped = bytes(sealed[:-1]) + bytes([sealed[-1] ^ 1])
        await conn.execute(
            text("UPDATE grants SET refresh_token = :v WHERE id = :id"),
            {"v": flipped, "id": damaged.id},
        )
    clock.advance(DUE)
    with structlog.testing.capture_logs() as logged:
        b.refresher.start()
        try:
            await until(lambda: len(idp.calls) == 2)
            await asyncio.sleep(0.1)
            assert len(idp.calls) == 2  # nothing was sent for the damaged grant
            unreadable = [e for e in logged if e["event"] == "grants_unreadable"]
            assert len(unreadable) == 1, "the damaged grant was not reported once"
            assert unreadable[0]["grants"] == [f"{PROVIDER}/user1"]
            assert unreadable[0]["count"] == 1
            assert "does not open" in unreadable[0]["reason"]
            async with engine.begin() as conn:  # the row is restored from a backup
                await conn.execute(
                    text("UPDATE grants SET refresh_token = :v WHERE id = :id"),
                    {"v": sealed, "id": damaged.id},
                )
            clock.advance(30)  # not yet tried again: nothing restored could be known so soon
            b.refresher.poke()
            await asyncio.sleep(0.1)
            assert len(idp.calls) == 2
            clock.advance(31)  # past the minute it waits
            b.refresher.poke()
            await until(lambda: len(idp.calls) == 3)

            async def refreshed() -> bool:
                return (await b.stored("user1")).generation == damaged.generation + 1

            await until(refreshed)
        finally:
            await b.refresher.stop()
    assert results(idp) == ["rotated"] * 3
    assert idp.violations == []


async def test_the_schedule_loop_drains_a_backlog_at_max_concurrency(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """After an outage, due grants are refreshed at most max_concurrency at a time (6)."""
    b = broker(repo, idp, clock, max_concurrency=2)
    users = [f"user{i}" for i in range(6)]
    for user in users:
        await b.login(idp, user, clock())
    clock.advance(DUE)
    idp.gate = asyncio.Event()
    b.refresher.start()
    try:
        await until(lambda: idp.in_flight == 2)
        for _ in range(5):
            b.refresher.poke()
            await asyncio.sleep(0.02)
        assert idp.in_flight == 2
        idp.gate.set()

        async def all_refreshed() -> bool:
            return all(g.generation == 2 for g in await repo.all())

        await until(all_refreshed)
    finally:
        await b.refresher.stop()
    assert idp.max_in_flight == 2
    assert results(idp) == ["rotated"] * 6
    assert idp.violations == []


class CountingRepository(GrantRepository):
    """The real repository, counting how often the schedule loop asks what is due."""

    due_calls = 0

    async def due(self, now: datetime, limit: int, providers: Iterable[str]) -> list[DueGrant]:
        """Count, then answer as the real repository does."""
        self.due_calls += 1
        return await super().due(now, limit, providers)


async def test_the_schedule_loop_sleeps_while_a_due_refresh_is_in_flight(
    engine: AsyncEngine, keyring: Keyring, idp: ModelIdp, clock: HandClock
) -> None:
    """While the only due grant is being refreshed, the loop polls at most once a second (6)."""
    repo = CountingRepository(engine, keyring)
    b = broker(repo, idp, clock)
    await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.gate = asyncio.Event()
    b.refresher.start()
    try:
        await until(lambda: idp.in_flight == 1)
        before = repo.due_calls
        await asyncio.sleep(0.5)
        spins = repo.due_calls - before
    finally:
        idp.gate.set()
        await b.refresher.stop()
    assert spins <= 2


async def test_the_schedule_loop_sleeps_past_a_grant_of_an_unconfigured_provider(
    engine: AsyncEngine, keyring: Keyring, idp: ModelIdp, clock: HandClock
) -> None:
    """A stored grant whose provider left the config does not make the loop spin (6)."""
    repo = CountingRepository(engine, keyring)
    b = broker(repo, idp, clock)
    orphan = Grant(
        id="",
        provider="removed",
        user="alice",
        state=GrantState.ACTIVE,
        generation=0,
        tokens=TokenSet(refresh_token=Secret(idp.mint("rt"))),
        next_refresh_at=clock(),
    )
    await repo.insert(orphan, clock())
    b.refresher.start()
    try:
        await asyncio.sleep(0.1)
        before = repo.due_calls
        await asyncio.sleep(0.5)
        spins = repo.due_calls - before
    finally:
        await b.refresher.stop()
    assert spins <= 2
    assert idp.calls == []
