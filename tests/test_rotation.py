"""The rotation protocol under faults: the provider's answers, the store's failures, a reload.

Against the model strict-rotation IdP of tests/model_idp.py and a real SQLite store, as
tests/test_refresher.py. The store's failures here come from a repository that fails chosen
writes the way a locked or unreachable database does (StoreUnavailable) before or after doing
them; tests/test_faults.py injects the same faults with real parts (a held lock, a stopped
PostgreSQL) against the real IdP. Each test names the ROTATION.md invariant it proves, and ends
by asserting the model saw no spent refresh token presented outside grace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.config import ProviderConfig
from broker.crypto import Keyring
from broker.errors import IdpNotProcessed, IdpUnreachable, StoreUnavailable, TokenUnavailable
from broker.live import LiveMap
from broker.model import Grant, GrantState
from broker.rotation import IN_FLIGHT
from broker.schedule import ROTATION_LOST
from broker.store.repository import GrantRepository
from broker.store.rotations import Claim
from broker.tasks import Tasks
from tests.model_idp import (
    PROVIDER,
    RETRY_AFTER,
    Fault,
    HandClock,
    Incarnation,
    ModelIdp,
    provider_config,
)
from tests.test_refresher import DUE, broker, family_chain, results, revealed, until

# -- a store that fails --------------------------------------------------------------------------


class FailingRepository(GrantRepository):
    """The real repository; chosen writes fail as an unreachable or locked database makes them.

    `fail_before[name] = n` makes the next n calls of `name` fail without writing;
    `fail_after[name] = n` makes them write and then fail (the commit landed, the answer was
    lost: a connection dropped after COMMIT).
    """

    def __init__(self, engine: AsyncEngine, keyring: Keyring) -> None:
        super().__init__(engine, keyring)
        self.fail_before: dict[str, int] = {}
        self.fail_after: dict[str, int] = {}
        self.failures: list[str] = []

    async def _faulty(self, name: str, write: Callable[[], Awaitable[Any]]) -> Any:
        if self.fail_before.get(name, 0) > 0:
            self.fail_before[name] -= 1
            self.failures.append(f"{name}: before")
            raise StoreUnavailable("the database did not complete the operation (injected)")
        result = await write()
        if self.fail_after.get(name, 0) > 0:
            self.fail_after[name] -= 1
            self.failures.append(f"{name}: after")
            raise StoreUnavailable("the database did not complete the operation (injected)")
        return result

    async def claim(
        self,
        grant: Grant,
        owner: str,
        now: datetime,
        lease: timedelta,
        *,
        capacity: int | None = None,
    ) -> Claim:
        """Claim, or fail as told."""
        result: Claim = await self._faulty(
            "claim",
            lambda: super(FailingRepository, self).claim(
                grant, owner, now, lease, capacity=capacity
            ),
        )
        return result

    async def commit_refresh(
        self, grant: Grant, expected_generation: int, write_id: str, now: datetime
    ) -> Grant:
        """Commit, or fail as told."""
        result: Grant = await self._faulty(
            "commit",
            lambda: super(FailingRepository, self).commit_refresh(
                grant, expected_generation, write_id, now
            ),
        )
        return result

    async def settle(self, grant: Grant, owner: str, now: datetime, **kw: Any) -> Grant:
        """Settle, or fail as told."""
        result: Grant = await self._faulty(
            "settle", lambda: super(FailingRepository, self).settle(grant, owner, now, **kw)
        )
        return result

    async def changed_elsewhere(self, grant_id: str, generation: int, now: datetime) -> bool:
        """Read, or fail as told (the token path's check near a refresh time)."""
        result: bool = await self._faulty(
            "read",
            lambda: super(FailingRepository, self).changed_elsewhere(grant_id, generation, now),
        )
        return result


@pytest.fixture
def failing(engine: AsyncEngine, keyring: Keyring) -> FailingRepository:
    """A repository over the test's store whose writes fail when the test says so."""
    return FailingRepository(engine, keyring)


# -- the provider's answers: invariants 4 and 5 ---------------------------------------------------


@pytest.mark.parametrize("fault", [Fault.UNAVAILABLE, Fault.RATE_LIMITED])
async def test_a_503_or_429_backs_off_and_keeps_the_same_refresh_token(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock, fault: Fault
) -> None:
    """A load balancer's 503 (or a 429) says the provider did not act: without any grace the
    grant stays active at its generation, backs off by Retry-After, and the same refresh token
    rotates on the next attempt (4, 5)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(fault)
    after = await b.refresher.refresh(grant)
    assert after is not None
    stored = await b.stored("alice")
    assert stored.state is GrantState.ACTIVE
    assert stored.generation == grant.generation
    assert stored.tokens == grant.tokens
    assert stored.intent_at is None
    assert stored.refresh_failures == 1
    assert stored.next_refresh_at is not None
    assert stored.next_refresh_at >= clock() + timedelta(seconds=RETRY_AFTER)
    assert b.count("rotation_recoveries", "lost") == 0
    clock.advance(RETRY_AFTER + 1)
    refreshed = await b.refresher.refresh(b.cached("alice"))
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1
    assert results(idp) == [fault.value, "rotated"]
    assert idp.violations == []


async def test_invalid_client_pauses_the_provider_and_leaves_every_grant_as_it_is(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """invalid_client is about the client, not the user: the grant keeps its tokens, state,
    schedule and failure count; the provider pauses (exported), no other grant of it is sent
    while paused, and a reload of the provider resumes it (5)."""
    b = broker(repo, idp, clock)
    alice = await b.login(idp, "alice", clock())
    bob = await b.login(idp, "bob", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.CLIENT_REJECTED)
    await b.refresher.refresh(alice)
    stored = await b.stored("alice")
    assert stored.state is GrantState.ACTIVE
    assert stored.generation == alice.generation
    assert stored.tokens == alice.tokens
    assert stored.next_refresh_at == alice.next_refresh_at
    assert stored.refresh_failures == alice.refresh_failures
    assert stored.intent_at is None
    assert stored.last_error is not None
    assert "invalid_client" in stored.last_error
    assert (
        b.metrics.registry.get_sample_value("token_broker_provider_paused", {"provider": PROVIDER})
        == 1
    )
    assert b.refresher.retry_after(PROVIDER) is not None
    await b.refresher.refresh(b.cached("bob"))  # paused: nothing is sent
    assert results(idp) == ["client_rejected"]
    assert (await b.stored("bob")).version == bob.version
    b.refresher.resume(PROVIDER)  # what a reload of the provider's config does
    assert (
        b.metrics.registry.get_sample_value("token_broker_provider_paused", {"provider": PROVIDER})
        == 0
    )
    refreshed = await b.refresher.refresh(b.cached("alice"))
    assert refreshed is not None
    assert refreshed.generation == alice.generation + 1
    assert idp.violations == []


async def test_a_failed_discovery_sends_nothing_writes_nothing_and_backs_the_provider_off(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """Metadata or keys that cannot be fetched fail before the intent is written: "never sent",
    whatever the failure looked like, so no grant can be lost to it; the provider as a whole
    backs off, and callers keep being served the still-valid token (4)."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.prepare_error = IdpUnreachable("connection reset while fetching discovery")
    after = await b.refresher.refresh(grant)
    assert after == grant
    assert idp.calls == []
    stored = await b.stored("alice")
    assert stored.version == grant.version  # not even an intent was written
    assert stored.intent_at is None
    served = await b.service.token(PROVIDER, "alice")
    assert served.tokens.access_token == grant.tokens.access_token
    assert b.refresher.retry_after(PROVIDER) is not None
    idp.prepare_error = None
    b.refresher.resume(PROVIDER)
    refreshed = await b.refresher.refresh(b.cached("alice"))
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1
    assert idp.violations == []


# -- introspection: invariant 4 -------------------------------------------------------------------


async def test_an_ambiguous_refresh_the_provider_never_processed_is_kept_by_introspection(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """Without grace, a provider that lets the client introspect says the old refresh token is
    still active. Right after the send that is not yet the truth (the request may still be at
    the provider), so the intent stays and the provider is asked again once no request can be
    on its way; still active then, it never rotated: the grant stays active, recovered, and
    rotates later (4)."""
    idp.introspection = True
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.AMBIGUOUS_BEFORE)
    sent = clock()
    await b.refresher.refresh(grant)
    waiting = await b.stored("alice")
    assert waiting.state is GrantState.ACTIVE
    assert waiting.intent_at is not None  # still unknown
    assert waiting.next_refresh_at == sent + IN_FLIGHT
    assert idp.introspections == 1
    assert b.count("rotation_recoveries", "recovered") == 0
    clock.advance(IN_FLIGHT)
    await b.refresher.refresh(b.cached("alice"))
    stored = await b.stored("alice")
    assert stored.state is GrantState.ACTIVE
    assert stored.generation == grant.generation
    assert stored.intent_at is None
    assert stored.next_refresh_at is not None
    assert stored.next_refresh_at > clock()
    assert idp.introspections == 2
    assert b.count("rotation_recoveries", "recovered") == 1
    assert b.count("rotation_recoveries", "lost") == 0
    clock.advance(60)
    refreshed = await b.refresher.refresh(b.cached("alice"))
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1
    assert results(idp) == ["ambiguous_before", "rotated"]
    assert idp.violations == []


async def test_a_request_still_at_the_provider_when_introspection_answers_is_waited_for(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """The provider says "active" while the request that carried the token is still being
    processed there (a broker killed mid-call, a slow provider). The token is not presented
    again on that word: when the request lands and rotates, the next check finds the token
    spent, and the grant is lost without a reuse detection (4)."""
    idp.introspection = True
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.AMBIGUOUS_BEFORE)
    await b.refresher.refresh(grant)
    assert (await b.stored("alice")).intent_at is not None
    # The request lands late: the provider rotates the token.
    assert grant.tokens.refresh_token is not None
    await idp.refresh(grant.tokens.refresh_token)
    clock.advance(IN_FLIGHT)
    await b.refresher.refresh(b.cached("alice"))
    lost = await b.stored("alice")
    assert lost.state is GrantState.REAUTH_REQUIRED
    assert (lost.last_error or "").startswith(ROTATION_LOST)
    assert idp.introspections == 2
    assert results(idp) == ["ambiguous_before", "rotated"]  # the late landing; no second send
    assert idp.replays == 0
    assert idp.violations == []


async def test_an_ambiguous_refresh_the_provider_did_rotate_is_lost_when_introspection_says_so(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """The provider rotated and no grace can replay: introspection says the old token is no
    longer active, and only then is the grant rotation_lost (4, 7)."""
    idp.introspection = True
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.AMBIGUOUS_AFTER)
    lost = await b.refresher.refresh(grant)
    assert lost is not None
    assert lost.state is GrantState.REAUTH_REQUIRED
    assert lost.last_error is not None
    assert lost.last_error.startswith(ROTATION_LOST)
    assert "no longer active" in lost.last_error
    assert idp.introspections == 1
    assert results(idp) == ["ambiguous_after"]
    assert idp.violations == []


async def test_a_failed_introspection_keeps_the_outcome_unknown_and_asks_again(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """An introspection that does not answer decides nothing: the intent stays, the grant waits
    with a back-off, nothing is sent again, and the next attempt asks again (4)."""
    idp.introspection = True
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.AMBIGUOUS_BEFORE)
    idp.introspection_error = IdpNotProcessed("the introspection endpoint answered 503")
    await b.refresher.refresh(grant)
    stored = await b.stored("alice")
    assert stored.state is GrantState.ACTIVE
    assert stored.intent_at is not None  # still unknown
    with pytest.raises(TokenUnavailable):
        await b.service.token(PROVIDER, "alice")  # the cached token may be dead: not served
    clock.advance(60)
    await b.refresher.refresh(b.cached("alice"))
    assert idp.introspections == 2
    assert results(idp) == ["ambiguous_before"]  # nothing was sent again meanwhile
    kept = await b.stored("alice")
    assert kept.intent_at is None
    assert kept.state is GrantState.ACTIVE
    assert idp.violations == []


# -- the store fails: invariant 7 -----------------------------------------------------------------


async def test_a_commit_the_store_refuses_is_retried_until_it_lands_and_callers_get_503_meanwhile(
    failing: FailingRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """The provider rotated; the store refuses the commit three times: the new tokens are held
    in memory and committed on the fourth try, callers get 503 with a short Retry-After in
    between (never the token the provider deleted, never an error), and the retries are
    counted (7)."""
    b = broker(failing, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    failing.fail_before["commit"] = 3
    refresh = b.refresher.refresh(grant)
    await until(lambda: b.refresher.commit_pending(grant.id))
    with pytest.raises(TokenUnavailable) as refused:
        await b.service.token(PROVIDER, "alice")
    assert refused.value.retry_after == 1
    refreshed = await asyncio.wait_for(refresh, 10)
    assert refreshed is not None
    stored = await b.stored("alice")
    assert stored.generation == grant.generation + 1
    assert revealed(stored.tokens.refresh_token) == family_chain(idp, grant)[-1]
    assert stored.intent_at is None
    assert failing.failures == ["commit: before"] * 3
    assert b.metrics.registry.get_sample_value("token_broker_store_commit_retries_total") == 3
    served = await b.service.token(PROVIDER, "alice")
    assert served.tokens.access_token == stored.tokens.access_token
    assert results(idp) == ["rotated"]
    assert idp.violations == []


async def test_a_commit_that_landed_but_whose_answer_was_lost_is_recognised(
    failing: FailingRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A commit that reached the disk but failed on the way back (a connection dropped after
    COMMIT) is found by its write id on the retry: success, not a conflict (7)."""
    b = broker(failing, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    failing.fail_after["commit"] = 1
    refreshed = await b.refresher.refresh(grant)
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1
    assert b.cached("alice").generation == grant.generation + 1
    assert failing.failures == ["commit: after"]
    assert results(idp) == ["rotated"]
    assert idp.violations == []


async def test_a_back_off_the_store_refuses_is_retried_until_it_lands(
    failing: FailingRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A 503 from the provider whose back-off the store refuses to record is still recorded,
    after retries: the intent does not stay behind to be mistaken for a lost rotation (7)."""
    b = broker(failing, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.fail_next(Fault.UNAVAILABLE)
    failing.fail_before["settle"] = 2
    await b.refresher.refresh(grant)
    stored = await b.stored("alice")
    assert stored.intent_at is None
    assert stored.state is GrantState.ACTIVE
    assert stored.refresh_failures == 1
    assert failing.failures == ["settle: before"] * 2
    assert idp.violations == []


async def test_a_claim_the_store_refuses_sends_nothing_and_the_token_is_still_served(
    failing: FailingRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A store that cannot take the claim stops the refresh before anything leaves; callers are
    served the valid cached token, even when the check near the refresh time fails too (7)."""
    b = broker(failing, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    failing.fail_before["claim"] = 1
    failing.fail_before["read"] = 1
    after = await b.refresher.refresh(grant)
    assert after == grant
    assert idp.calls == []
    served = await b.service.token(PROVIDER, "alice")
    assert served.tokens.access_token == grant.tokens.access_token
    assert failing.failures == ["claim: before", "read: before"]
    assert idp.violations == []


# -- a reload, a deletion, a clock step -----------------------------------------------------------


async def test_a_reload_that_removes_the_provider_mid_call_keeps_the_new_tokens(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A refresh at the provider when a reload removes that provider still stores what it got:
    the call works with the config it started with (2, 7)."""
    providers: LiveMap[str, ProviderConfig] = LiveMap({PROVIDER: provider_config()})
    b = Incarnation.build(repo, idp, clock, providers=providers)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.gate = asyncio.Event()
    refresh = b.refresher.refresh(grant)
    await until(lambda: idp.in_flight == 1)
    providers.replace({})
    idp.gate.set()
    refreshed = await asyncio.wait_for(refresh, 5)
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1
    assert (await b.stored("alice")).generation == grant.generation + 1
    assert idp.violations == []


async def test_deleting_a_grant_waits_for_its_refresh_and_revokes_the_new_refresh_token(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """DELETE while the grant's refresh is at the provider waits for it to be stored, then
    revokes the refresh token that is live now, not the one just spent."""
    b = broker(repo, idp, clock)
    grant = await b.login(idp, "alice", clock())
    clock.advance(DUE)
    idp.gate = asyncio.Event()
    refresh = b.refresher.refresh(grant)
    await until(lambda: idp.in_flight == 1)
    tasks = Tasks()
    delete = tasks.spawn(b.service.revoke(PROVIDER, "alice"), "revoke")
    await asyncio.sleep(0.1)
    assert not delete.done()
    idp.gate.set()
    await asyncio.wait_for(refresh, 5)
    assert await asyncio.wait_for(delete, 5) is True
    assert idp.revoked == [family_chain(idp, grant)[-1]]
    assert await repo.get(PROVIDER, "alice") is None
    assert idp.violations == []


class SteppingClock:
    """A wall clock the test can set back, as an operator or NTP might."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def move(self, seconds: float) -> None:
        """Move the clock by `seconds`, backwards when negative."""
        self.now += timedelta(seconds=seconds)


async def test_after_the_wall_clock_steps_back_the_grant_keeps_being_refreshed(
    repo: GrantRepository, idp: ModelIdp, clock: HandClock
) -> None:
    """A back-off stored after a ten-minute step back carries an earlier updated_at than the
    one before it, yet it is the newer write: it is published, and the grant is refreshed when
    it comes due again instead of being skipped forever (9)."""
    stepping = SteppingClock(clock())
    b = broker(repo, idp, stepping)  # type: ignore[arg-type]
    idp.clock = stepping
    grant = await b.login(idp, "alice", stepping())
    stepping.move(DUE)
    idp.fail_next(Fault.UNAVAILABLE)
    await b.refresher.refresh(grant)
    first = b.cached("alice")
    stepping.move(-600)
    stepping.move(RETRY_AFTER * 2)
    idp.fail_next(Fault.UNAVAILABLE)
    await b.refresher.refresh(first)
    second = b.cached("alice")
    assert second.version > first.version
    assert second.updated_at is not None
    assert first.updated_at is not None
    assert second.updated_at < first.updated_at  # stamped by the stepped-back clock
    assert second.refresh_failures == 2  # published all the same
    stepping.move(RETRY_AFTER * 4)
    refreshed = await b.refresher.refresh(b.cached("alice"))
    assert refreshed is not None
    assert refreshed.generation == grant.generation + 1
    assert idp.violations == []
