"""The refresher: proactive refresh, one refresh per grant at a time, leases and recovery.

Read this against ROTATION.md; each step names the invariant it keeps.

One refresh of one grant (`_refresh`):

1. Single flight (1). Within this process a grant has at most one refresh task; callers that
   need it await the task through `asyncio.shield`, so a caller that gives up never cancels
   the IdP call.
2. Before anything is written, whatever can fail without spending the token is resolved (the
   provider's metadata and keys, `TokenClient.prepare`): such a failure is "never sent" (4) and
   backs the whole provider off (broker.gates), costing the grant nothing.
3. The claim: one compare-and-swap write takes the grant's lease (across processes sharing the
   store, only when no other owner holds a live one) and records the intent to send, and
   succeeds only while the row is still the version this process holds (so the token sent is
   the stored one, and a back-off or rotation another process just stored is respected). The
   claimed grant, intent set, is published at once: callers of this grant wait for the new token
   instead of being served the one the provider is about to delete. A claim lost to another
   owner frees the concurrency slot at once; the caller waits for the change, not the task.
4. The claimed grant's refresh token is spent by `broker.rotation` (lease checked before every
   send, replay inside grace, introspection, the compare-and-swap commit retried until it lands,
   back-off and rotation_lost; its docstring walks through invariants 2 to 7). Only after the
   rotation's commit does the cache (and so any caller) see the new access token (2, persist
   before publish). A client error (invalid_client) pauses the provider (5).
5. Refresh ahead of need (6): the rotation schedules each grant's next refresh; the schedule
   loop starts due refreshes with at most `max_concurrency` in flight per provider.

The schedule loop (`run`) follows the store's change sequence (`sync`: writes and deletions by
anyone, in version order), asks the store for due grants through an index, and sleeps until the
next due time (at most `POLL` seconds; less while a caller waits for another process's refresh).
Local timers (cool-downs, gates) run on the monotonic clock, so a step of the wall clock moves
no deadline of this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta

import structlog

from broker.cache import GrantCache
from broker.config import ProviderConfig
from broker.errors import BrokerError, ConflictError, IdpError, StoreError
from broker.gates import ProviderGate
from broker.idp.http import MAX_CALL_SECONDS
from broker.metrics import Metrics
from broker.model import Grant, GrantState
from broker.rotation import REPLAY_MARGIN, Attempt, Lease, Rotated, Rotation, TokenClient
from broker.schedule import RefreshPolicy, backoff, replay_delay
from broker.store.repository import GrantRepository
from broker.tasks import Tasks

__all__ = [
    "LEASE",
    "POLL",
    "REPLAY_MARGIN",
    "STALL_AFTER",
    "SWEEP_SECONDS",
    "Refresher",
    "TokenClient",
    "dead_here",
    "owner_id",
]

# The lease must outlive the longest IdP call, or a second owner could start while the first
# is still waiting for its answer.
LEASE = timedelta(seconds=MAX_CALL_SECONDS * 3)
POLL = timedelta(seconds=1)
FAST_POLL_SECONDS = 0.05  # while a caller waits for a refresh another process is making
EXCLUSIVE_POLL_SECONDS = 0.2
SWEEP_SECONDS = 5.0  # how often the loop looks for dead owners' leases
STALL_AFTER = timedelta(seconds=30)
DUE_BATCH = 256
log = structlog.get_logger("broker.refresher")


def owner_id() -> str:
    """A lease owner name unique to this process incarnation: host/pid/random."""
    return f"{socket.gethostname()[:40]}/{os.getpid()}/{secrets.token_hex(4)}"


def dead_here(owner: str) -> bool:
    """Whether `owner` names a process on this host that no longer runs.

    A broker restarted after a crash must not wait for its predecessor's leases to expire:
    by then a provider's refresh_grace may have passed and an interrupted rotation be lost.
    Owners on other hosts cannot be checked and keep their leases until they expire.
    """
    host, _, rest = owner.partition("/")
    pid_text = rest.partition("/")[0]
    if host != socket.gethostname()[:40] or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another uid
    return False


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
    ) -> None:
        self._repository = repository
        self._cache = cache
        self._clients = clients
        self._providers = providers
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self.owner = owner or owner_id()
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
        self._limits: dict[str, asyncio.Semaphore] = {}  # per provider, made on first use
        self._gates: dict[str, ProviderGate] = {}
        self._inflight: dict[str, asyncio.Task[Grant | None]] = {}
        self._sending: set[str] = set()  # claimed: the token is at (or about to reach) the IdP
        self._held: set[str] = set()  # held off by `exclusive`: no refresh may start
        self._cooldown: dict[str, float] = {}  # grant id -> monotonic time
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._syncing: asyncio.Task[None] | None = None
        self._tasks = Tasks()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False
        self.heartbeat: float | None = None  # monotonic time of the loop's last round
        # The change sequence value up to which this process has published the store's writes.
        self.seen_version = 0
        cache.subscribe(self._published)

    # -- single flight ---------------------------------------------------------------------

    def refresh(self, grant: Grant) -> asyncio.Task[Grant | None]:
        """The one task refreshing `grant` in this process, started if none is running."""
        task = self._inflight.get(grant.id)
        if task is None:
            task = self._tasks.spawn(
                self._refresh(grant.id, grant.provider, grant.version), f"refresh {grant.name}"
            )
            self._inflight[grant.id] = task
            task.add_done_callback(lambda done: self._forget(grant.id, done))
        return task

    async def wait(self, grant: Grant, seconds: float) -> Grant | None:
        """Refresh `grant` and wait at most `seconds`; giving up never cancels the call.

        When another process holds the grant's lease, waits (within `seconds`) for the change
        it stores, without holding anything of this process's.
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
        """Wait at most `seconds` until this process publishes a newer version of `grant`
        (from its own refresh, or from the store's change sequence)."""
        if seconds <= 0:
            return
        current = self._cache.by_id(grant.id)
        if current is None or current.version != grant.version:
            return
        task = self._inflight.get(grant.id)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), seconds)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(grant.id, []).append(future)
        deadline = time.monotonic() + seconds
        try:
            # Another process is refreshing it: follow the store's change sequence closely
            # until this process publishes the change (or the wait ends).
            while (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(future), min(FAST_POLL_SECONDS, left))
                except TimeoutError:
                    await self._sync_now()
                else:
                    return
        finally:
            waiting = self._waiters.get(grant.id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(grant.id, None)

    async def _sync_now(self) -> None:
        """One `sync` shared by everyone waiting; a store that cannot answer is not an error."""
        if self._syncing is None or self._syncing.done():
            self._syncing = self._tasks.spawn(self.sync(), "sync")
        with contextlib.suppress(StoreError):
            await asyncio.shield(self._syncing)

    def _published(self, before: Grant | None, after: Grant | None) -> None:
        grant = after or before
        if grant is None:
            return
        for future in self._waiters.pop(grant.id, []):
            if not future.done():
                future.set_result(None)

    def is_rotating(self, grant_id: str) -> bool:
        """Whether this process has claimed the grant: its refresh token is at the IdP, or its
        outcome is being stored."""
        return grant_id in self._sending

    def commit_pending(self, grant_id: str) -> bool:
        """Whether the grant's new tokens are known but the store has not taken them yet."""
        return grant_id in self._rotation.pending

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

    # -- the schedule loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Refresh grants as they come due, until cancelled."""
        last_sweep = 0.0
        while True:
            self.heartbeat = time.monotonic()
            try:
                await self.sync()
                if time.monotonic() - last_sweep > SWEEP_SECONDS:
                    await self._break_dead_leases()
                    last_sweep = time.monotonic()
                now = self._clock()
                await self._start_due(now)
                delay = await self._sleep_for(now)
            except StoreError as exc:
                log.warning("refresh_loop_store_unavailable", reason=str(exc))
                delay = POLL.total_seconds()
            except Exception:  # the loop must outlive a bad moment of the store
                log.exception("refresh_loop_error")
                delay = POLL.total_seconds()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def sync(self) -> None:
        """Follow the store's change sequence: publish what anyone wrote or deleted since."""
        changes = await self._repository.changes_since(self.seen_version)
        for grant in changes.written:
            self._cache.put(grant)
        for gone in changes.deleted:
            cached = self._cache.get(gone.provider, gone.user)
            if cached is not None and cached.id == gone.grant_id:
                self._cache.drop(gone.provider, gone.user)
        self.seen_version = max(self.seen_version, changes.version)

    async def _start_due(self, now: datetime) -> None:
        mono = time.monotonic()
        for due in await self._repository.due(now, DUE_BATCH, self._providers.keys()):
            if due.id in self._inflight or self.gate(due.provider).closed(mono):
                continue
            if self._cooldown.get(due.id, mono) > mono:
                continue
            self._cooldown.pop(due.id, None)
            grant = self._cache.by_id(due.id)
            if grant is None:  # written by another process since the last sync
                grant = await self._repository.get_by_id(due.id)
                if grant is None:
                    continue
                self._cache.put(grant)
            self.refresh(grant)

    async def _sleep_for(self, now: datetime) -> float:
        """Until the next grant comes due, at most POLL; a refresh ending wakes the loop."""
        next_due = await self._repository.next_due_at(now, self._providers.keys())
        if next_due is None or next_due <= now:
            # Nothing due, or only what is in flight or cooling down: nothing to start now.
            return POLL.total_seconds()
        return min((next_due - now).total_seconds(), POLL.total_seconds())

    def poke(self) -> None:
        """Wake the loop now (a grant was stored or changed)."""
        self._wake.set()

    async def recover(self) -> int:
        """Start finishing refreshes that dead processes left with an unknown outcome.

        Leases of dead processes on this host are broken first, so recovery happens now,
        inside the provider's grace, not after the leases expire.
        """
        await self._break_dead_leases()
        pending = [grant for grant in self._cache if grant.intent_at is not None]
        if pending:
            log.warning("recovering_refreshes", grants=len(pending))
        for grant in pending:
            self.refresh(grant)
        return len(pending)

    async def _break_dead_leases(self) -> int:
        """Free the leases of dead processes on this host (a predecessor, or a sibling)."""
        dead = {owner for owner in await self._repository.lease_owners() if dead_here(owner)}
        broken = await self._repository.break_leases(dead)
        if broken:
            log.warning("broke_dead_leases", owners=len(dead), grants=broken)
        return broken

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

    # -- one refresh -----------------------------------------------------------------------

    async def _refresh(self, grant_id: str, provider: str, seen: int) -> Grant | None:
        """Refresh one grant as the caller (or the loop) last saw it: at version `seen`.

        Never raises for a store or provider failure: the caller gets the grant as this
        process now holds it, and decides again from that.
        """
        # The provider as it is now; a reload during the call does not change what it uses.
        config, client = self._providers.get(provider), self._clients.get(provider)
        if config is None or client is None:
            return self._cache.by_id(grant_id)
        limit = self._limits.setdefault(provider, asyncio.Semaphore(self._max_concurrency))
        async with limit:
            cached = self._cache.by_id(grant_id)
            if not self._may_start(cached, seen):
                return cached
            assert cached is not None
            try:
                await client.prepare()
            except IdpError as exc:
                self._provider_unreachable(provider, exc)
                return cached
            try:
                claimed = await self._claim(cached)
                if claimed is None and await self._held_by_the_dead(cached):
                    # A process that died mid-refresh left its lease: recover it now, inside
                    # the provider's grace, rather than after the lease runs out.
                    cached = self._cache.by_id(grant_id) or cached
                    claimed = await self._claim(cached)
            except StoreError as exc:
                self._cool_down(cached, exc)
                return self._cache.by_id(grant_id)
            if claimed is not None:
                grant, lease = claimed
                attempt = Attempt(grant, config, client, lease, cached.intent_at is not None)
                return await self._run_claimed(attempt)
        return await self._lost_claim(grant_id, seen)

    @contextlib.asynccontextmanager
    async def exclusive(self, grant: Grant, seconds: float) -> AsyncIterator[Grant | None]:
        """Hold off every refresh of `grant`, here and in other processes, while the caller
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
            while True:
                now = self._clock()
                if await self._repository.take_lease(grant.id, self.owner, now, now + LEASE):
                    break
                if time.monotonic() > deadline:
                    raise ConflictError(f"a refresh of {grant.name} is in flight elsewhere")
                await asyncio.sleep(EXCLUSIVE_POLL_SECONDS)
            yield await self._repository.get_by_id(grant.id)
        finally:
            self._held.discard(grant.id)
            await self._release(grant)

    def _may_start(self, cached: Grant | None, seen: int) -> bool:
        """Whether a refresh asked for at version `seen` may go ahead with what is cached.

        Not when shutting down, deleted, changed since the caller looked (a rotation or a
        back-off stored meanwhile: the caller decides again on what is there), without a
        refresh token, or while its provider's gate is closed.
        """
        if self._stopping or cached is None or cached.version != seen or cached.id in self._held:
            return False
        if cached.tokens.refresh_token is None:
            return False
        return not self.gate(cached.provider).closed(time.monotonic())

    async def _claim(self, grant: Grant) -> tuple[Grant, Lease] | None:
        """Take the lease and record the intent; None when another owner or a newer write is
        in the way."""
        taken_at, now = time.monotonic(), self._clock()
        claimed = await self._repository.claim(grant, self.owner, now, now + LEASE)
        if claimed is None:
            return None
        lease = Lease(self._repository, claimed, self.owner, LEASE, self._clock, taken_at=taken_at)
        return claimed, lease

    async def _held_by_the_dead(self, grant: Grant) -> bool:
        """After a lost claim: whether dead processes' leases were in the way (now broken);
        the row as it stands is published either way."""
        if not await self._break_dead_leases():
            return False
        stored = await self._repository.get_by_id(grant.id)
        if stored is None:
            return False
        self._cache.put(stored)
        return stored.state is GrantState.ACTIVE

    async def _lost_claim(self, grant_id: str, seen: int) -> Grant | None:
        """The claim failed: the row changed since, or another owner holds its lease."""
        try:
            stored = await self._repository.get_by_id(grant_id)
        except StoreError:
            return self._cache.by_id(grant_id)
        if stored is None:
            cached = self._cache.by_id(grant_id)
            if cached is not None:
                self._cache.drop(cached.provider, cached.user)
            return None
        self._cache.put(stored)
        if stored.version == seen:
            # Another owner's live lease: it announced nothing visible yet; its write will.
            log.debug("refresh_held_elsewhere", grant=stored.name)
        return self._cache.by_id(grant_id)

    async def _run_claimed(self, attempt: Attempt) -> Grant | None:
        grant = attempt.grant
        self._sending.add(grant.id)
        self._cache.put(grant)  # the intent: callers wait for the new token from now on
        try:
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
        """The grant as the store holds it now, published."""
        try:
            grant = await self._repository.get_by_id(grant_id)
        except StoreError:
            return self._cache.by_id(grant_id)
        if grant is not None:
            self._cache.put(grant)
        return self._cache.by_id(grant_id)

    async def _release(self, grant: Grant) -> None:
        try:
            await asyncio.shield(self._repository.release(grant.id, self.owner))
        except Exception:  # noqa: BLE001 - the lease expires by itself
            log.warning("lease_release_failed", grant=grant.name)
