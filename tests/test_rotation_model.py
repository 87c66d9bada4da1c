"""A model-based test of strict rotation: Hypothesis drives the real refresher against a model IdP.

Each example is one broker installation: a fresh SQLite store, the real GrantRepository,
Refresher and GrantService, and the model IdP of tests/model_idp.py, all reading one hand-moved
clock. Hypothesis picks the provider's grace (0 or 30 s) and then a sequence of steps: time
passes; a grant is refreshed as the schedule loop would; the due grants are refreshed at once;
a caller fetches a token (sometimes with min_ttl); a person logs in again; the broker is killed
at a chosen instant (at the IdP before or after it rotated, or just after a store write) and
restarted; or it is stopped and restarted cleanly. Any step may fail the IdP call it makes.

After every step the invariants of ROTATION.md are checked against the store and the model:
no spent refresh token is presented outside grace (3); an active grant holds the model's live
refresh token, a reauth_required one has a reason, and rotation_lost only follows an unknown
outcome once grace is over (4, 7); generations only grow and equal the rotations the broker
adopted, and the tokens of a generation never change, so a transient failure cannot change
them (5); a served token is the stored one and valid at the model when served (2); replays are
bounded (4); the counters agree with what the model saw.

Modelling choices:
- A killed process is the BaseException `Killed`, raised at the kill point; the refresher does
  not catch it, so nothing after that instant runs and the lease stays held. Each process's
  lease owner names a pid that is known dead on this host (a reaped child), so the restarted
  broker's `recover()` breaks the leases as it would after a real crash; waiting out LEASE
  (90 s) instead would always overrun a 30 s grace and turn every recovery into rotation_lost.
- The refresher's pause between replays (`replay_delay`) passes on the hand clock instead of
  in real time, so examples run fast and grace can run out during a pause; a "hanging" IdP
  also takes 7 s of that clock per call.
- A replay inside grace returns the same pair with the full expires_in, as
  django-oauth-toolkit does; access tokens live until they expire or their family is revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import random
import secrets
import shutil
import tempfile
from collections.abc import Coroutine, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar
from unittest import mock

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sqlalchemy.ext.asyncio import AsyncEngine

import broker.refresher
from broker.crypto import Keyring
from broker.errors import ReauthRequired, TokenUnavailable
from broker.grants import Import
from broker.log import configure_logging
from broker.model import Grant, GrantState, TokenSet
from broker.refresher import REPLAY_MARGIN
from broker.schedule import ROTATION_LOST, replay_delay
from broker.store.engine import create_engine
from broker.store.migrate import upgrade
from broker.store.repository import GrantRepository
from broker.store.rotations import Claim, ClaimOutcome
from tests.model_idp import (
    PROVIDER,
    RETRY_AFTER,
    TRANSIENT,
    Call,
    Fault,
    HandClock,
    Incarnation,
    Killed,
    ModelIdp,
    dead_node,
)

T = TypeVar("T")
USERS = ("alice", "bob")
HANG = timedelta(seconds=7)  # how long each call of a hanging IdP takes before timing out
CALLS_PER_STEP = 100  # far above any legitimate step; the model refuses calls past it
STEP_SECONDS = 20.0  # real time; a step takes milliseconds unless something waits in vain

Scenario = Fault | Literal["hanging"]
# Where a broker may be killed: at the IdP call, before the request left or after the IdP
# rotated; or just after a store write: holding the lease with no intent yet, with the intent
# durable but nothing sent, or committed but not yet published.
KillPoint = Fault | Literal["after_claim", "after_commit"]
UNKNOWN_OUTCOME = frozenset(
    {Fault.AMBIGUOUS_BEFORE, Fault.AMBIGUOUS_AFTER, Fault.KILL_BEFORE, Fault.KILL_AFTER}
)

scenarios: st.SearchStrategy[Scenario] = st.one_of(
    st.just(Fault.NONE),
    st.sampled_from(
        [
            Fault.NONE,
            Fault.UNREACHABLE,
            Fault.RATE_LIMITED,
            Fault.TRANSIENT_OAUTH,
            Fault.AMBIGUOUS_BEFORE,
            Fault.AMBIGUOUS_AFTER,
            Fault.REJECTED,
            "hanging",
        ]
    ),
)
users = st.sampled_from(USERS)
min_ttls = st.sampled_from([0, 0, 60, 400, 700])


class KillableRepository(GrantRepository):
    """The real repository, with a kill point just after one of its writes."""

    kill_at: str | None = None

    def _maybe_die(self, point: str) -> None:
        if self.kill_at == point:
            self.kill_at = None
            raise Killed

    async def claim(
        self,
        grant: Grant,
        owner: str,
        now: datetime,
        lease: timedelta,
        *,
        capacity: int | None = None,
    ) -> Claim:
        """Claim (lease and intent), then perhaps die before sending."""
        claimed = await super().claim(grant, owner, now, lease, capacity=capacity)
        if claimed.outcome is ClaimOutcome.CLAIMED:
            self._maybe_die("after_claim")
        return claimed

    async def commit_refresh(
        self, grant: Grant, expected_generation: int, write_id: str, now: datetime
    ) -> Grant:
        """Commit, then perhaps die before publishing."""
        committed = await super().commit_refresh(grant, expected_generation, write_id, now)
        self._maybe_die("after_commit")
        return committed


class RotationMachine(RuleBasedStateMachine):
    """One broker installation under a sequence of steps chosen by Hypothesis."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="rotation-model-"))
        self.url = f"sqlite:///{self.dir / 'broker.db'}"
        self.clock = HandClock()
        self.keyring = Keyring.generate(self.clock())
        self.patch = mock.patch.object(broker.refresher, "replay_delay", self._pause)
        self.patch.start()
        # This example's logs, kept apart (at info level) and scanned for its tokens (8).
        self.log = io.StringIO()
        configure_logging(level="info", json=True, stream=self.log)
        self.minted: list[str] = []
        self.idp = ModelIdp(self.clock, mint=self._mint, replay_expires_in="remaining")
        self.engine: AsyncEngine | None = None
        self.broker: Incarnation | None = None
        self.repository: KillableRepository | None = None
        self.alive = False
        self.rand = random.Random(0)
        self.incarnations: list[Incarnation] = []
        # What the test knows, kept apart from what the broker stores.
        self.family: dict[str, str] = {}  # user -> the model family of the current login
        self.first_generation: dict[str, int] = {}  # user -> generation of that login
        self.seen: dict[str, Grant] = {}  # user -> the grant as last observed
        self.tokens_of: dict[tuple[str, int], TokenSet] = {}  # (user, generation) -> tokens
        self.unknown_since: dict[str, datetime] = {}  # user -> first send of a lost answer
        self.lost_events = 0
        self.recovered_events = 0
        self.kills = 0

    def _mint(self, prefix: str) -> str:
        value = f"{prefix}-{secrets.token_urlsafe(18)}"
        self.minted.append(value)
        return value

    def _pause(self, attempt: int) -> timedelta:
        """The refresher's pause before a replay, taken on the hand clock; nothing to sleep."""
        self.clock.advance(replay_delay(attempt))
        return timedelta(0)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on this machine's loop; a refresher stuck waiting fails, not hangs."""
        try:
            return self.loop.run_until_complete(asyncio.wait_for(coro, STEP_SECONDS))
        except TimeoutError:
            raise AssertionError(f"a step took more than {STEP_SECONDS} s of real time") from None

    def teardown(self) -> None:
        """Stop the broker, close the store, the loop and the directory."""
        try:
            if self.broker is not None and self.alive:
                self.run(self.broker.refresher.stop())
            if self.engine is not None:
                self.run(self.engine.dispose())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            logs = self.log.getvalue()
            leaked = [value for value in self.minted if value in logs]
            assert not leaked, f"{len(leaked)} token values reached the log"
        finally:
            self.loop.close()
            self.patch.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- set-up and restarts --------------------------------------------------------------------

    @initialize(grace=st.sampled_from([0, 30]), rand=st.randoms(use_true_random=False))
    def install(self, grace: int, rand: random.Random) -> None:
        """A fresh store, a provider with this grace, and a login for every user."""
        self.idp.grace = timedelta(seconds=grace)
        self.rand = rand
        self.run(self._boot(migrate=True))
        for user in USERS:
            self.run(self._login(user))
        self._observe()

    async def _boot(self, *, migrate: bool = False) -> int:
        """Start a broker process: its own engine and owner, load, recover."""
        if self.engine is not None:
            await self.engine.dispose()
        self.engine = create_engine(self.url)
        if migrate:
            await upgrade(self.engine)
        self.repository = KillableRepository(self.engine, self.keyring)
        self.broker = Incarnation.build(
            self.repository,
            self.idp,
            self.clock,
            grace=self.idp.grace,
            node=dead_node(),
            rand=self.rand.random,
        )
        self.incarnations.append(self.broker)
        self.alive = True
        return await self.broker.start()

    async def _login(self, user: str) -> None:
        assert self.broker is not None
        tokens = self.idp.login()
        assert tokens.refresh_token is not None
        family = self.idp.family_of(tokens.refresh_token)
        assert family is not None
        await self.broker.service.import_grant(
            Import(
                PROVIDER,
                user,
                tokens.refresh_token,
                tokens.access_token,
                tokens.expires_in,
                force=True,
            ),
            self.clock(),
        )
        self.family[user] = family.id
        self.first_generation[user] = (await self.broker.stored(user)).generation
        self.unknown_since.pop(user, None)

    # -- rules ----------------------------------------------------------------------------------

    @rule(seconds=st.integers(0, 700) | st.sampled_from([29, 30, 31, 3600, 86_400]))
    def time_passes(self, seconds: int) -> None:
        """Time passes (also while the broker is down)."""
        self.clock.advance(seconds)

    @precondition(lambda self: self.alive)
    @rule(user=users, scenario=scenarios)
    def refresh(self, user: str, scenario: Scenario) -> None:
        """The schedule loop refreshes one grant; the IdP call may fail as chosen."""
        with self._step(scenario):
            assert self.broker is not None
            self.run(_refreshed(self.broker, self.broker.cached(user)))

    @precondition(lambda self: self.alive)
    @rule(scenario=scenarios)
    def refresh_due(self, scenario: Scenario) -> None:
        """The schedule loop starts every due grant at once; the first IdP call may fail."""
        with self._step(scenario):
            self.run(self._refresh_due())

    async def _refresh_due(self) -> None:
        assert self.broker is not None
        assert self.repository is not None
        tasks = [
            self.broker.refresher.refresh(grant)
            for due in await self.repository.due(self.clock(), 256, [PROVIDER])
            if (grant := self.broker.cache.by_id(due.id)) is not None
        ]
        await asyncio.gather(*tasks)

    @precondition(lambda self: self.alive)
    @rule(user=users, min_ttl=min_ttls, scenario=scenarios)
    def fetch(self, user: str, min_ttl: int, scenario: Scenario) -> None:
        """A caller asks for a token; a served token must be stored and valid at the IdP (2)."""
        with self._step(scenario):
            self.run(self._fetch(user, min_ttl))

    @precondition(lambda self: self.alive)
    @rule(user=users, min_ttl=min_ttls, scenario=scenarios)
    def fetch_during_refresh(self, user: str, min_ttl: int, scenario: Scenario) -> None:
        """A caller asks while the grant is being refreshed: it joins, or is served before."""
        with self._step(scenario):
            self.run(self._fetch_during_refresh(user, min_ttl))

    async def _fetch_during_refresh(self, user: str, min_ttl: int) -> None:
        assert self.broker is not None
        refreshing = self.broker.refresher.refresh(self.broker.cached(user))
        await asyncio.gather(refreshing, self._fetch(user, min_ttl))

    async def _fetch(self, user: str, min_ttl: int) -> None:
        """Ask for a token and check the answer at the instant it is given."""
        assert self.broker is not None
        try:
            served = await self.broker.service.token(PROVIDER, user, min_ttl)
        except ReauthRequired:
            stored = await self.broker.stored(user)
            assert stored.effective_state(self.clock()) is not GrantState.ACTIVE or (
                stored.access_ttl(self.clock()) == 0
            )
            return
        except TokenUnavailable:
            stored = await self.broker.stored(user)
            assert stored.state is GrantState.ACTIVE
            assert stored.access_ttl(self.clock()) == 0
            return
        now = self.clock()
        token = served.tokens.access_token
        assert token is not None
        assert served.access_ttl(now) > 0
        assert self.idp.is_valid(token, now), "served a token the IdP does not accept"
        stored = await self.broker.stored(user)
        committed = {t.access_token for (u, _), t in self.tokens_of.items() if u == user}
        assert token in committed | {stored.tokens.access_token}, "served an unstored token"

    @precondition(lambda self: self.alive)
    @rule(user=users)
    def login_again(self, user: str) -> None:
        """A person logs in again for a grant that needs it."""
        assert self.broker is not None
        if self.run(self.broker.stored(user)).state is GrantState.ACTIVE:
            return
        self.run(self._login(user))
        self._observe()

    @precondition(lambda self: self.alive)
    @rule(user=users, point=st.sampled_from([Fault.KILL_BEFORE, Fault.KILL_AFTER]))
    def crash_at_the_idp(self, user: str, point: KillPoint) -> None:
        """The broker is killed during an IdP call, before or after the IdP rotated."""
        self._crash(user, point)

    @precondition(lambda self: self.alive)
    @rule(user=users, point=st.sampled_from(["after_claim", "after_commit"]))
    def crash_in_the_store(self, user: str, point: KillPoint) -> None:
        """The broker is killed just after one of its store writes."""
        self._crash(user, point)

    def _crash(self, user: str, point: KillPoint) -> None:
        assert self.broker is not None
        assert self.repository is not None
        before = self._guard()
        if isinstance(point, Fault):
            self.idp.fail_next(point)
        else:
            self.repository.kill_at = point
        try:
            self.run(_refreshed(self.broker, self.broker.cached(user)))
        except Killed:
            self.kills += 1
            if point == "after_claim":
                self.unknown_since.setdefault(user, self.clock())
        # Killed or not (an inactive grant is never sent), the process is gone now.
        self.alive = False
        self.idp.faults.clear()
        self.repository.kill_at = None
        self._observe(calls_from=before)

    @precondition(lambda self: not self.alive)
    @rule(scenario=st.sampled_from([Fault.NONE, Fault.AMBIGUOUS_AFTER, Fault.UNREACHABLE]))
    def restart(self, scenario: Fault) -> None:
        """The broker starts again over the same store and finishes interrupted refreshes."""
        with self._step(scenario):
            pending = self.run(self._boot())
            assert self.broker is not None
            open_intents = [g for g in self.broker.cache if g.intent_at is not None]
            assert pending == len(open_intents)
            for grant in open_intents:
                self.run(_refreshed(self.broker, grant))

    @precondition(lambda self: not self.alive)
    @rule()
    def restart_and_die_recovering(self) -> None:
        """Killed again while replaying the one interrupted refresh: the intent must survive."""
        before = self._guard()
        interrupted = [g for g in self.run(self._stored()) if g.intent_at is not None]
        if len(interrupted) == 1:  # then the one IdP call of this start is that replay
            self.idp.fail_next(Fault.KILL_AFTER)
        try:
            self.run(self._boot())
            assert self.broker is not None
            for grant in interrupted:
                self.run(_refreshed(self.broker, grant))
        except Killed:
            self.kills += 1
            self.alive = False
        self.idp.faults.clear()
        self._observe(calls_from=before)

    @precondition(lambda self: self.alive)
    @rule()
    def restart_cleanly(self) -> None:
        """The broker is stopped (SIGTERM) and started again."""
        assert self.broker is not None
        self._guard()
        self.run(self.broker.refresher.stop())
        assert self.run(self._boot()) == 0
        self._observe()

    # -- what each step is checked for ----------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, scenario: Scenario) -> Iterator[None]:
        """Arm the scenario for one step; then disarm it and check what the step changed."""
        idp = self.idp
        before = self._guard()
        if scenario == "hanging":
            idp.sticky, idp.latency = Fault.AMBIGUOUS_AFTER, HANG
        elif scenario is not Fault.NONE:
            assert isinstance(scenario, Fault)
            idp.fail_next(scenario)
        try:
            yield
        finally:
            idp.sticky, idp.latency = None, timedelta(0)
            idp.faults.clear()
        self._observe(calls_from=before)
        calls = idp.calls[before:]
        bound = self._call_bound(scenario)
        for family in {c.family for c in calls}:
            made = sum(c.family == family for c in calls)
            assert made <= bound, f"{made} IdP calls for one grant in one step"

    def _guard(self) -> int:
        """Bound this step's IdP calls (a looping refresher fails the step); calls so far."""
        before = len(self.idp.calls)
        self.idp.call_limit = before + CALLS_PER_STEP
        return before

    def _call_bound(self, scenario: Scenario) -> int:
        """The most calls one grant may make in one step: a first try plus replays in grace."""
        grace = self.idp.grace
        if scenario == "hanging":  # each replay after at least the shortest pause
            return 1 + math.ceil(grace / min(replay_delay(1), HANG))
        return 1 if grace == timedelta(0) else 2

    def _observe(self, calls_from: int | None = None) -> None:
        """Check how each grant changed in this step, then remember it."""
        calls = self.idp.calls[calls_from:] if calls_from is not None else []
        now = self.clock()
        for grant in self.run(self._stored()):
            user = grant.user
            mine = [c for c in calls if c.family == self.family[user]]
            unknown = [c.at for c in mine if c.fault in UNKNOWN_OUTCOME]
            if unknown:
                self.unknown_since.setdefault(user, min(unknown))
            self._check_change(self.seen.get(user), grant, mine, now)
            self.seen[user] = grant

    def _check_change(
        self, before: Grant | None, after: Grant, calls: list[Call], now: datetime
    ) -> None:
        """Check one grant's change in one step against what the IdP calls of the step were."""
        user = after.user
        if before is None or before.id != after.id:
            return
        assert after.generation >= before.generation, "a generation went back"
        if after.generation > before.generation:
            if user in self.unknown_since:  # a refresh with an unknown outcome, finished
                self.recovered_events += 1
            self.unknown_since.pop(user, None)
        lost_now = before.state is GrantState.ACTIVE and after.state is GrantState.REAUTH_REQUIRED
        if lost_now:
            assert after.last_error, "reauth_required without a reason"
            if after.last_error.startswith(ROTATION_LOST):
                since = self.unknown_since.get(user)
                assert since is not None, "rotation_lost without an unknown outcome"
                # Given up only once the grace is over (less the refresher's margin for the
                # clocks of two machines). The refresher counts the grace from the send, and
                # `since` is when this test saw the outcome: up to one hanging call later.
                grace = self.idp.grace
                assert grace == timedelta(0) or now + REPLAY_MARGIN + HANG >= since + grace, (
                    "rotation_lost while the provider's grace still ran"
                )
                self.lost_events += 1
            else:
                assert "invalid_grant" in after.last_error
                assert any(c.fault is Fault.REJECTED for c in calls), "reauth without refusal"
            self.unknown_since.pop(user, None)
        transient = [c for c in calls if c.fault in TRANSIENT]
        if transient and after.generation == before.generation and before.intent_at is None:
            # A transient failure (outside recovery) backs off and changes nothing else (5).
            assert after.state is before.state
            assert after.refresh_failures == before.refresh_failures + len(transient)
            assert after.next_refresh_at is not None
            assert after.next_refresh_at > now
            if transient[-1].fault is Fault.RATE_LIMITED:
                assert after.next_refresh_at >= now + timedelta(seconds=RETRY_AFTER)

    async def _stored(self) -> list[Grant]:
        assert self.engine is not None
        return await GrantRepository(self.engine, self.keyring).all()

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def no_spent_token_is_presented_outside_grace(self) -> None:
        """The model IdP never saw reuse, an unknown token, or a looping refresher (3, 4)."""
        assert self.idp.violations == []

    @invariant()
    def every_grant_is_usable_or_says_why_not(self) -> None:
        """Active with a live refresh token, or reauth_required with a reason (4, 7)."""
        if self.engine is None:
            return
        now = self.clock()
        for grant in self.run(self._stored()):
            user = grant.user
            assert grant.state is not GrantState.REVOKED
            if grant.state is GrantState.REAUTH_REQUIRED:
                assert grant.last_error
                assert grant.last_error.startswith(ROTATION_LOST) or (
                    "invalid_grant" in grant.last_error
                )
                continue
            token = grant.tokens.refresh_token
            assert token is not None
            family = self.idp.family_of(token)
            assert family is not None
            assert family.id == self.family[user]
            assert not family.revoked
            current = self.idp.current(family)
            if token.reveal() == current:
                assert self.idp.is_live(token, now)
            else:
                # Only a dead broker leaves the previous token stored: the IdP rotated, the
                # process died before its commit, and the intent says so for recovery (7).
                assert not self.alive, "an active grant holds a spent refresh token"
                assert token.reveal() == family.chain[-2]
                assert grant.intent_at is not None

    @invariant()
    def generations_count_adopted_rotations_and_never_change_their_tokens(self) -> None:
        """Generation = login's + rotations adopted; a generation's tokens never change (5)."""
        if self.engine is None:
            return
        for grant in self.run(self._stored()):
            user = grant.user
            token = grant.tokens.refresh_token
            assert token is not None
            family = self.idp.family_of(token)
            assert family is not None
            rotations = family.chain.index(token.reveal())
            if family.id == self.family[user]:
                assert grant.generation == self.first_generation[user] + rotations
            key = (user, grant.generation)
            assert self.tokens_of.setdefault(key, grant.tokens) == grant.tokens

    @invariant()
    def a_live_broker_holds_no_lease_and_serves_what_is_stored(self) -> None:
        """Between steps nothing is in flight: no lease, no intent, cache equal to store (1, 2)."""
        if not self.alive or self.broker is None:
            return
        assert self.run(self.broker.repository.lease_owners()) == set()
        for grant in self.run(self._stored()):
            assert grant.intent_at is None
            cached = self.broker.cached(grant.user)
            assert (cached.generation, cached.state, cached.tokens) == (
                grant.generation,
                grant.state,
                grant.tokens,
            )

    @invariant()
    def counters_agree_with_the_model(self) -> None:
        """Refresh counters add up to the calls the IdP answered; recoveries to what happened."""
        killed = sum(c.fault in (Fault.KILL_BEFORE, Fault.KILL_AFTER) for c in self.idp.calls)
        counted = sum(
            b.count("refresh", outcome)
            for b in self.incarnations
            for outcome in ("success", "invalid_grant", "transient_error", "ambiguous")
        )
        assert counted == len(self.idp.calls) - killed
        lost = sum(b.count("rotation_recoveries", "lost") for b in self.incarnations)
        assert lost == self.lost_events
        recovered = sum(b.count("rotation_recoveries", "recovered") for b in self.incarnations)
        assert recovered == self.recovered_events


async def _refreshed(process: Incarnation, grant: Grant) -> Grant | None:
    """Refresh `grant` in `process` (or join its refresh in flight) and wait for the end."""
    return await process.refresher.refresh(grant)


RotationMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRotationModel = RotationMachine.TestCase
