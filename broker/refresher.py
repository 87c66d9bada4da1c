"""The refresher: proactive refresh, one refresh per grant at a time, leases and recovery.

Read this against ROTATION.md; each step names the invariant it keeps.

One refresh of one grant:

1. Single flight (1). Within this process a grant has at most one refresh task; callers that
   need it await the task through `asyncio.shield`, so a caller that gives up never cancels
   the IdP call.
2. Before anything is written, whatever can fail without spending the token is resolved (the
   provider's metadata and keys, `TokenClient.prepare`): such a failure is "never sent" (4) and
   backs the whole provider off (broker.gates), costing the grant nothing.
3. The claim (broker.store.rotations): one write takes the grant's lease, only when no live
   owner holds it and the provider has fewer than `max_concurrency` refreshes in flight across
   every broker on the store, and records the intent to send; a caller's claim also requires
   the row to be the version it holds, so the token sent is the stored one and a back-off or
   rotation another broker just stored is respected. The claim is announced (published here,
   notified to other brokers, and on a shared store given a moment to arrive, broker.follower)
   before the token leaves, so every broker holds that grant's callers for the new token
   instead of serving the one the provider deletes. A claim lost to another owner holds
   nothing here: the caller waits for the change (broker.follower), not for a task.
4. The claimed grant's refresh token is spent by `broker.rotation` (lease checked before every
   send, replay inside grace, introspection, the compare-and-swap commit retried until it
   lands, back-off and rotation_lost; its docstring walks through invariants 2 to 7). Only
   after the rotation's commit does the cache (and so any caller) see the new access token (2,
   persist before publish). A client error (invalid_client) pauses the provider (5).
5. Refresh ahead of need (6): the rotation schedules each grant's next refresh; the schedule
   loop claims due grants in batches, skipping rows another broker is claiming at that moment;
   a broker that died mid-refresh (its heartbeat stale, broker.fleet) leaves its intents due
   at once, and any live broker recovers them (lease_takeovers_total counts those).

The schedule loop (`run`) asks the store for due grants through an index and sleeps until the
next due time (at most `POLL` seconds), or until the follower publishes a change. Local timers
(cool-downs, gates) run on the monotonic clock, so a step of the wall clock moves no deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog

from broker.agenda import RECHECK, Agenda
from broker.cache import GrantCache
from broker.config import ProviderConfig
from broker.errors import BrokerError, ConflictError, IdpError, StoreError
from broker.fleet import Fleet
from broker.follower import Follower
from broker.gates import ProviderGate
from broker.idp.http import MAX_CALL_SECONDS
from broker.metrics import Metrics
from broker.model import Grant
from broker.rotation import REPLAY_MARGIN, Attempt, Lease, Rotated, Rotation, TokenClient
from broker.schedule import RefreshPolicy, backoff, replay_delay
from broker.store.repository import GrantRepository
from broker.store.rotations import Claim, ClaimOutcome
from broker.tasks import Tasks, wait_event

__all__ = [
    "LEASE",
    "POLL",
    "REPLAY_MARGIN",
    "STALL_AFTER",
    "Refresher",
    "TokenClient",
]

# Longer than the longest IdP call, and renewed by the fleet's heartbeat while a call is in
# flight: a live owner's lease never lapses under it, a dead one's is taken over by liveness.
LEASE = timedelta(seconds=MAX_CALL_SECONDS + 15)
POLL = timedelta(seconds=1)
# How long a due grant whose row does not open waits before its claim is tried again.
UNREADABLE_RECHECK = timedelta(seconds=60)
CALLER_CLAIM_SECONDS = 5.0  # how long a caller's refresh waits for room under max_concurrency
ROOM_POLL_SECONDS = 0.05
EXCLUSIVE_POLL_SECONDS = 0.2
CLAIM_SPREAD_SECONDS = 0.05  # in a fleet, a random pause before claiming spreads the work
STALL_AFTER = timedelta(seconds=30)
DUE_BATCH = 64
# Near saturation (less than 1/CLAIM_GATHER_BELOW of the slots free, grants due), the schedule
# waits up to CLAIM_GATHER_SECONDS for more slots to free up before it claims (see _gather_slots).
CLAIM_GATHER_BELOW = 4
CLAIM_GATHER_SECONDS = 0.005
# While the store is unreachable the schedule loop says so on its first failure and then on
# every this many (one a second).
STORE_ERROR_LOG_EVERY = 30
log = structlog.get_logger("broker.refresher")


class Refresher:
    """Keeps every active grant's access token fresh; its Rotation alone spends refresh tokens."""

    def __init__(
        self,
        repository: GrantRepository,
        *,
        cache: GrantCache,
        clients: Mapping[str, TokenClient],
        providers: Mapping[str, ProviderConfig],
        policy: RefreshPolicy,
        max_concurrency: int,
        metrics: Metrics,
        clock: Callable[[], datetime],
        rand: Callable[[], float] = random.random,
        owner: str | None = None,
        follower: Follower | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self._repository = repository
        self._cache = cache
        self._clients = clients
        self._providers = providers
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self.fleet = fleet
        self.owner = fleet.me.id if fleet is not None else owner or secrets.token_hex(8)
        self.follower = follower or Follower(repository, cache, metrics, clock)
        self._rotation = Rotation(
            repository,
            policy=policy,
            metrics=metrics,
            clock=clock,
            rand=rand,
            owner=self.owner,
            # Taken from this module as the refresher is built, so that a test can move the
            # pauses between replays onto a hand clock by replacing broker.refresher.replay_delay.
            pause=replay_delay,
        )
        self._max_concurrency = max_concurrency
        self._gates: dict[str, ProviderGate] = {}
        self._inflight: dict[str, asyncio.Task[Grant | None]] = {}
        self._sending: set[str] = set()  # claimed: the token is at (or about to reach) the IdP
        self._sending_per_provider: Counter[str] = Counter()
        self._held: set[str] = set()  # held off by `exclusive`: no refresh may start
        self._cooldown: dict[str, float] = {}  # grant id -> monotonic time
        self._tasks = Tasks()
        self._wake = asyncio.Event()
        self._agenda = Agenda()
        self._starved = False  # the last claim found the provider's capacity in use
        cache.subscribe(self._agenda.update)
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False
        self.heartbeat: float | None = None  # monotonic time of the loop's last round

    # -- single flight ---------------------------------------------------------------------

    def refresh(self, grant: Grant) -> asyncio.Task[Grant | None]:
        """The one task refreshing `grant` in this process, started if none is running."""
        task = self._inflight.get(grant.id)
        if task is None:
            task = self._track(grant, self._refresh(grant.id, grant.provider, grant.version))
        return task

    def _track(
        self, grant: Grant, work: Coroutine[Any, Any, Grant | None]
    ) -> asyncio.Task[Grant | None]:
        task = self._tasks.spawn(work, f"refresh {grant.name}")
        self._inflight[grant.id] = task
        task.add_done_callback(lambda done: self._forget(grant.id, done))
        return task

    async def wait(self, grant: Grant, seconds: float) -> Grant | None:
        """Refresh `grant` and wait at most `seconds`; giving up never cancels the call.

        When another broker holds the grant's lease, waits (within `seconds`) for the change
        it stores, without holding anything of this one's.
        """
        deadline = time.monotonic() + seconds
        try:
            result = await asyncio.wait_for(asyncio.shield(self.refresh(grant)), seconds)
        except TimeoutError:
            return None
        current = self._cache.by_id(grant.id)
        if current is not None and current.intent_at is not None and not self.is_rotating(grant.id):
            await self.wait_for_change(current, deadline - time.monotonic())
            return self._cache.by_id(grant.id)
        return result

    async def wait_for_change(self, grant: Grant, seconds: float) -> None:
        """Wait at most `seconds` until a newer version of `grant` is published here (from
        this broker's own refresh, or from the store)."""
        task = self._inflight.get(grant.id)
        if task is not None and seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), seconds)
            return
        await self.follower.wait_for_change(grant, seconds)

    def is_rotating(self, grant_id: str) -> bool:
        """Whether this broker has claimed the grant: its refresh token is at the IdP, or its
        outcome is being stored."""
        return grant_id in self._sending

    def behind(self, grant: Grant) -> bool:
        """Whether another broker has written a newer version of `grant` than this one holds
        (announced by the store's feed, not yet read)."""
        return self.follower.behind(grant)

    def commit_pending(self, grant_id: str) -> bool:
        """Whether the grant's new tokens are known but the store has not taken them yet."""
        return grant_id in self._rotation.pending

    def in_flight(self) -> list[str]:
        """The grants this broker holds leases on for calls in flight (the heartbeat renews
        those leases)."""
        return list(self._sending)

    def gate(self, provider: str) -> ProviderGate:
        """The provider's gate (made open on first use)."""
        return self._gates.setdefault(provider, ProviderGate())

    def retry_after(self, provider: str) -> float | None:
        """Seconds until the provider may be called again, or None when it may be now."""
        return self.gate(provider).retry_after(time.monotonic())

    def resume(self, provider: str) -> None:
        """Open the provider's gate (its config was reloaded): call it again at once."""
        gate = self.gate(provider)
        if gate.paused:
            log.info("provider_resumed", provider=provider, reason="its config was reloaded")
        gate.open()
        self._metrics.provider_paused.labels(provider).set(0)
        self._wake.set()

    def _forget(self, grant_id: str, task: asyncio.Task[Grant | None]) -> None:
        if self._inflight.get(grant_id) is task:
            del self._inflight[grant_id]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Failed before its IdP call (reading or claiming the grant): say so, without the
            # exception's text, which for a database error may quote stored values.
            detail = str(exc) if isinstance(exc, BrokerError) else type(exc).__name__
            log.error("refresh_not_started", grant_id=grant_id, error=detail)
        self._wake.set()  # the loop's view of what is due has changed

    @contextlib.asynccontextmanager
    async def exclusive(self, grant: Grant, seconds: float) -> AsyncIterator[Grant | None]:
        """Hold off every refresh of `grant`, here and in other brokers, while the caller
        changes it outside a refresh (revokes it); yields the grant as stored once none is
        in flight, or None when it is gone.

        ConflictError when a refresh elsewhere still holds the grant after `seconds`.
        """
        self._held.add(grant.id)
        deadline = time.monotonic() + seconds
        try:
            task = self._inflight.get(grant.id)
            if task is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), seconds)
            while not await self._repository.take_lease(grant.id, self.owner, self._clock(), LEASE):
                if time.monotonic() > deadline:
                    raise ConflictError(f"a refresh of {grant.name} is in flight elsewhere")
                await asyncio.sleep(EXCLUSIVE_POLL_SECONDS)
            yield await self._repository.get_by_id(grant.id)
        finally:
            self._held.discard(grant.id)
            await self._release(grant)

    # -- the schedule loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Refresh grants as they come due, until cancelled."""
        follow = self._tasks.spawn(self.follower.run(self._wake.set), "follow the store")
        failures = 0  # store errors in a row
        try:
            while True:
                self.heartbeat = time.monotonic()
                try:
                    now = self._clock()
                    await self._start_due(now)
                    delay = await self._sleep_for(now)
                except StoreError as exc:
                    failures += 1
                    if failures % STORE_ERROR_LOG_EVERY == 1:  # the first, then now and then
                        log.warning(
                            "refresh_loop_store_unavailable", reason=str(exc), in_a_row=failures
                        )
                    # The store is down: try again after POLL, whatever wakes the loop.
                    self._wake.clear()
                    await asyncio.sleep(POLL.total_seconds())
                    continue
                except Exception:  # the loop must outlive a bad moment of the store
                    log.exception("refresh_loop_error")
                    delay = POLL.total_seconds()
                else:
                    if failures:
                        log.info("refresh_loop_store_available", after_failures=failures)
                    failures = 0
                self._wake.clear()
                await wait_event(self._wake, delay)
        finally:
            follow.cancel()

    async def sync(self) -> None:
        """Publish what anyone wrote to the store since this broker last looked."""
        await self.follower.sync()

    async def _start_due(self, now: datetime) -> None:
        """Claim the grants the agenda has due, in batches per provider, and start a refresh
        for each claimed; those that cannot start now go back on the agenda for later."""
        # No more than could start here now: what is taken and cannot start goes back on the
        # agenda, and during a backlog that would be a batch's worth for each refresh ending.
        free = self._free_slots()
        if free * CLAIM_GATHER_BELOW < self._max_concurrency and self._sending:
            next_due = self._agenda.next_at()
            if next_due is not None and next_due <= now:
                free = await self._gather_slots()
                now = self._clock()
        if free < 1:
            self._starved = True  # until a refresh ends and wakes the loop
            return
        self._starved = False
        mono = time.monotonic()
        wanted: dict[str, list[tuple[Grant, int]]] = defaultdict(list)
        for grant_id, version in self._agenda.take_due(now, min(free, DUE_BATCH)):
            grant = self._cache.by_id(grant_id)
            if grant is None or grant.version != version or grant.id in self._inflight:
                continue  # gone, superseded, or being refreshed here: it will be published
            later = self._not_before(grant, mono)
            if later is not None:
                self._agenda.put(grant.id, now + timedelta(seconds=later), version)
                continue
            wanted[grant.provider].append((grant, version))
        if not wanted:
            return
        if self.fleet is not None and self.fleet.peers:
            # Every broker wakes at the same due time; a random pause lets a different one
            # win each time, which spreads the refreshes over the fleet.
            await asyncio.sleep(CLAIM_SPREAD_SECONDS * self._rand())
        for provider, grants in sorted(wanted.items()):
            # No more than this broker could start (the fleet may allow fewer): the rest stay
            # due, on the agenda, without a claim or a task made for them.
            room = self._max_concurrency - self._sending_per_provider[provider]
            for grant, version in grants[max(room, 0) :]:
                self._agenda.put(grant.id, now, version)
            if room > 0:
                await self._claim_batch(provider, grants[:room], now)
            else:
                self._starved = True

    def _free_slots(self) -> int:
        return sum(
            max(0, self._max_concurrency - self._sending_per_provider[provider])
            for provider in self._providers
        )

    async def _gather_slots(self) -> int:
        """Nearly every slot is busy and grants are due: refreshes are about to end, and their
        slots claimed together cost one transaction instead of one each. Wait for them a
        moment (at most CLAIM_GATHER_SECONDS); the free slots then."""
        loop = asyncio.get_running_loop()
        until = loop.time() + CLAIM_GATHER_SECONDS
        free = self._free_slots()
        while self._sending and free * CLAIM_GATHER_BELOW < self._max_concurrency:
            left = until - loop.time()
            if left <= 0:
                break
            self._wake.clear()  # set again by the next refresh to end
            await wait_event(self._wake, left)
            free = self._free_slots()
        return free

    def _not_before(self, grant: Grant, mono: float) -> float | None:
        """Seconds until `grant` may be tried here (a local cool-down, a closed gate,
        held off), or None when it may be now."""
        if grant.id in self._held:
            return RECHECK.total_seconds()
        waits = [self._cooldown.get(grant.id, mono) - mono]
        gate = self.gate(grant.provider).retry_after(mono)
        if gate is not None:
            waits.append(gate)
        wait = max(waits)
        return wait if wait > 0 else None

    async def _claim_batch(
        self, provider: str, grants: list[tuple[Grant, int]], now: datetime
    ) -> None:
        config, client = self._providers.get(provider), self._clients.get(provider)
        if config is None or client is None or self._stopping:
            return  # an unconfigured provider's grants wait for a reload that adds it back
        # Each grant's refresh is this process's one refresh of it from now on (a caller asking
        # meanwhile shares it), although the claim is made for the whole batch below.
        loop = asyncio.get_running_loop()
        claims: dict[str, asyncio.Future[Attempt | None]] = {}
        versions: dict[str, int] = {}
        for grant, version in grants:
            if grant.id in self._inflight:
                continue
            claims[grant.id] = loop.create_future()
            versions[grant.id] = version
            self._track(grant, self._batched(grant.id, claims[grant.id]))
        try:
            await self._claim_ids(config, client, claims, versions, now=now)
        finally:
            for claim in claims.values():
                if not claim.done():
                    claim.set_result(None)

    async def _claim_ids(
        self,
        config: ProviderConfig,
        client: TokenClient,
        claims: dict[str, asyncio.Future[Attempt | None]],
        versions: dict[str, int],
        *,
        now: datetime,
    ) -> None:
        """Claim the grants of `claims` in one write, and hand each its attempt (or None)."""
        if not claims:
            return
        provider = config.name
        try:
            await client.prepare()
        except IdpError as exc:
            self._provider_unreachable(provider, exc)
            for grant_id, version in versions.items():
                self._agenda.put(grant_id, now + RECHECK, version)
            return
        taken_at = time.monotonic()
        try:
            batch = await self._repository.claim_ids(
                provider,
                self.owner,
                self._clock(),
                LEASE,
                capacity=self._max_concurrency,
                ids=list(claims),
            )
        except Exception:  # a store that is down, or anything else: still due, try again
            for grant_id, version in versions.items():
                self._agenda.put(grant_id, now + RECHECK, version)
            raise
        claimed = {claim.grant.id for claim in batch.claims if claim.grant is not None}
        for grant_id, version in versions.items():
            if grant_id in claimed:
                continue
            # Not tried (no room): as soon as room frees (a refresh ending wakes the loop).
            # Tried but not claimed: held by another broker, or not due by the store; look
            # again after a while, or when the grant is published anew.
            # Unreadable: not before a restart or a restored row can have changed that.
            if grant_id in batch.unreadable:
                again = now + UNREADABLE_RECHECK
            else:
                again = now + RECHECK if grant_id in batch.tried else now
            self._agenda.put(grant_id, again, version)
        for claim in batch.claims:
            assert claim.grant is not None
            self._took_over(claim)
            lease = Lease(
                self._repository, claim.grant, self.owner, LEASE, self._clock, taken_at=taken_at
            )
            claims[claim.grant.id].set_result(
                Attempt(claim.grant, config, client, lease, claim.recovering)
            )
        self._starved = len(batch.tried) < len(claims)

    async def _batched(self, grant_id: str, claim: asyncio.Future[Attempt | None]) -> Grant | None:
        """One grant's refresh of a batch: its rotation once the batch claimed it; the grant as
        cached when it was not claimed."""
        attempt = await claim
        if attempt is None:
            return self._cache.by_id(grant_id)
        return await self._run_claimed(attempt)

    async def _sleep_for(self, now: datetime) -> float:
        """Until the next grant comes due, at most POLL; a refresh ending (here or, through the
        follower, anywhere) wakes the loop sooner."""
        next_due = self._agenda.next_at()
        if next_due is None:
            return POLL.total_seconds()
        if next_due <= now:
            # Due, but nothing more can start now (the provider's capacity is in use): wait
            # for a refresh to end.
            return POLL.total_seconds() if self._starved else 0.0
        return min((next_due - now).total_seconds(), POLL.total_seconds())

    def poke(self) -> None:
        """Wake the loop now (a grant was stored or changed)."""
        self._wake.set()

    async def recover(self) -> int:
        """Start finishing refreshes that dead brokers left with an unknown outcome.

        Brokers of this machine that died are found first (broker.fleet), so recovery happens
        now, inside the provider's grace, not after their leases would have expired.
        """
        if self.fleet is not None:
            await self.fleet.survey()
        pending = [grant for grant in self._cache if grant.intent_at is not None]
        if pending:
            log.warning("recovering_refreshes", grants=len(pending))
        for grant in pending:
            self.refresh(grant)
        return len(pending)

    def start(self) -> None:
        """Start the schedule loop."""
        self._loop = self._tasks.spawn(self.run(), "refresh loop")

    def stalled(self) -> str | None:
        """Why the schedule loop is not healthy, or None."""
        if self._loop is None or self._loop.done():
            return "the schedule loop is not running"
        if (
            self.heartbeat is None
            or time.monotonic() - self.heartbeat > STALL_AFTER.total_seconds()
        ):
            return "the schedule loop has not run for a while"
        return None

    async def stop(self) -> None:
        """Stop scheduling; let refreshes in flight finish (bounded), then cancel the rest.

        Cancelling a refresh mid-call would leave its outcome unknown, which, for a provider
        without refresh_grace, costs the grant at the next start; so they get their time.
        """
        self._stopping = True
        if self._loop is not None:
            self._loop.cancel()
        inflight = list(self._inflight.values())
        if inflight:
            log.info("waiting_for_refreshes", count=len(inflight))
            await asyncio.wait(inflight, timeout=MAX_CALL_SECONDS + 5)
        await self._tasks.cancel_all()
        await self.follower.stop()

    # -- one refresh asked for by a caller -----------------------------------------------------

    async def _refresh(self, grant_id: str, provider: str, seen: int) -> Grant | None:
        """Refresh one grant as the caller (or recovery) last saw it: at version `seen`.

        Never raises for a store or provider failure: the caller gets the grant as this
        broker now holds it, and decides again from that.
        """
        # The provider as it is now; a reload during the call does not change what it uses.
        config, client = self._providers.get(provider), self._clients.get(provider)
        cached = self._cache.by_id(grant_id)
        if config is None or client is None or not self._may_start(cached, seen):
            return cached
        assert cached is not None
        try:
            await client.prepare()
        except IdpError as exc:
            self._provider_unreachable(provider, exc)
            return cached
        try:
            claim, lease = await self._claim_for_caller(cached)
        except StoreError as exc:
            self._cool_down(cached, exc)
            return self._cache.by_id(grant_id)
        if claim.grant is None or lease is None:
            return await self._reload(grant_id)
        attempt = Attempt(claim.grant, config, client, lease, claim.recovering)
        return await self._run_claimed(attempt)

    async def _claim_for_caller(self, grant: Grant) -> tuple[Claim, Lease | None]:
        """Claim `grant`, waiting a little for room under max_concurrency. A claim in the way
        that belongs to a broker of this machine that has died is taken over at once (the
        grant is then recovered). The lease when it was taken."""
        deadline = time.monotonic() + CALLER_CLAIM_SECONDS
        surveyed = followed = False
        while True:
            taken_at = time.monotonic()
            claim = await self._repository.claim(
                grant, self.owner, self._clock(), LEASE, capacity=self._max_concurrency
            )
            if claim.outcome is ClaimOutcome.CLAIMED:
                assert claim.grant is not None
                self._took_over(claim)
                lease = Lease(
                    self._repository, claim.grant, self.owner, LEASE, self._clock, taken_at=taken_at
                )
                return claim, lease
            if claim.outcome is ClaimOutcome.CHANGED and not followed:
                # Someone wrote it since: if that was a claim, its owner may be dead.
                followed = True
                stored = await self._reload(grant.id)
                if (
                    stored is None
                    or stored.intent_at is None
                    or stored.intent_at == grant.intent_at
                ):
                    return claim, None
                grant = stored
                continue
            if claim.outcome is ClaimOutcome.HELD and not surveyed and self.fleet is not None:
                surveyed = True  # its holder may be a broker of this machine that just died
                await self.fleet.survey()
                continue
            if claim.outcome is not ClaimOutcome.FULL or time.monotonic() > deadline:
                return claim, None
            await asyncio.sleep(ROOM_POLL_SECONDS)

    def _may_start(self, cached: Grant | None, seen: int) -> bool:
        """Whether a refresh asked for at version `seen` may go ahead with what is cached.

        Not when shutting down, deleted, changed since the caller looked (a rotation or a
        back-off stored meanwhile: the caller decides again on what is there), held off by
        `exclusive`, without a refresh token, or while its provider's gate is closed.
        """
        if self._stopping or cached is None or cached.version != seen or cached.id in self._held:
            return False
        if cached.tokens.refresh_token is None:
            return False
        return not self.gate(cached.provider).closed(time.monotonic())

    def _took_over(self, claim: Claim) -> None:
        if claim.took_over is None or claim.grant is None:
            return
        self._metrics.lease_takeovers.labels(claim.grant.provider).inc()
        log.warning(
            "lease_takeover",
            grant=claim.grant.name,
            previous_owner=claim.took_over,
            recovering=claim.grant.intent_at is not None,
        )

    async def _run_claimed(self, attempt: Attempt) -> Grant | None:
        grant = attempt.grant
        self._sending.add(grant.id)
        self._sending_per_provider[grant.provider] += 1
        self._cache.put(grant)  # the intent: callers wait for the new token from now on
        try:
            await self.follower.announced(grant)
            result = await self._rotation.rotate(attempt)
        except asyncio.CancelledError:
            await self._release(grant)  # any open intent stays, for recovery
            raise
        except ConflictError as exc:
            # Fenced off (an admin replaced the tokens, or the lease was taken over):
            # whatever the store holds now wins.
            log.warning("refresh_fenced_off", grant=grant.name, reason=str(exc))
            await self._release(grant)
            return await self._reload(grant.id)
        except StoreError as exc:
            # A write before the send failed (the lease could not be renewed): nothing new is
            # known; the intent stays for whoever claims the grant next.
            log.warning("refresh_interrupted_by_store", grant=grant.name, reason=str(exc))
            self._cool_down(grant, exc)
            await self._release(grant)
            return self._cache.by_id(grant.id)
        except Exception:
            log.exception("refresh_failed_unexpectedly", grant=grant.name)
            self._cool_down(grant, None)
            await self._release(grant)
            return self._cache.by_id(grant.id)
        finally:
            self._sending.discard(grant.id)
            self._sending_per_provider[grant.provider] -= 1
        self._cooldown.pop(grant.id, None)
        self._after(attempt, result)
        self._cache.put(result.grant)  # published only now, after the commit
        return self._cache.by_id(grant.id)

    def _after(self, attempt: Attempt, result: Rotated) -> None:
        """What the rotation's end means for the provider's gate."""
        provider = attempt.config.name
        gate = self.gate(provider)
        if result.client_error is not None:
            was_paused = gate.paused
            gate.pause(str(result.client_error), time.monotonic(), self._rand())
            self._metrics.provider_paused.labels(provider).set(1)
            if not was_paused:
                log.error(
                    "provider_paused",
                    provider=provider,
                    reason=str(result.client_error),
                    detail="the provider refuses this client; grants are kept as they are; "
                    "fix the client registration or its config and reload",
                )
        elif gate.paused or gate.failures:
            if gate.paused:
                log.info("provider_resumed", provider=provider, reason="a refresh got through")
            gate.open()
            self._metrics.provider_paused.labels(provider).set(0)

    def _provider_unreachable(self, provider: str, exc: IdpError) -> None:
        gate = self.gate(provider)
        gate.unreachable(str(exc), time.monotonic(), self._rand())
        log.warning(
            "provider_unreachable",
            provider=provider,
            reason=str(exc),
            retry_in_s=round(gate.until - time.monotonic(), 1),
            detail="nothing was sent; every grant of the provider waits",
        )

    def _cool_down(self, grant: Grant, exc: Exception | None) -> None:
        delay = backoff(grant.refresh_failures + 1, self._policy, self._rand())
        self._cooldown[grant.id] = time.monotonic() + delay.total_seconds()
        if exc is not None:
            log.warning("refresh_not_started", grant=grant.name, error=str(exc))

    async def _reload(self, grant_id: str) -> Grant | None:
        """The grant as the store holds it now, published (None: it is gone)."""
        try:
            grant = await self._repository.get_by_id(grant_id)
        except StoreError:
            return self._cache.by_id(grant_id)
        if grant is None:
            cached = self._cache.by_id(grant_id)
            if cached is not None:
                self._cache.drop(cached.provider, cached.user)
            return None
        self._cache.put(grant)
        return self._cache.by_id(grant_id)

    async def _release(self, grant: Grant) -> None:
        try:
            await asyncio.shield(self._repository.release(grant.id, self.owner))
        except Exception:  # noqa: BLE001 - the lease expires by itself
            log.warning("lease_release_failed", grant=grant.name)
