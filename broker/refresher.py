"""The refresher: proactive refresh, one refresh per grant at a time, leases and recovery.

Read this against ROTATION.md; each step names the invariant it keeps.

One refresh of one grant (`_refresh`):

1. Single flight (1). Within this process a grant has at most one refresh task; callers that
   need it await the task through `asyncio.shield`, so a caller that gives up never cancels
   the IdP call. Across processes sharing the store, the task first *claims the grant's lease*
   by compare-and-swap (`claim`): it succeeds only when no other owner holds a live lease.
   The lease outlives the longest possible IdP call (`LEASE` > `MAX_CALL_SECONDS`), and every
   later write is guarded by `lease_owner = me AND generation = g`: the generation fences off
   a process that lost its lease.
2. The claimed grant's refresh token is spent by `broker.rotation` (intent before send, replay
   inside grace, the compare-and-swap commit, back-off, rotation_lost; its docstring walks
   through them against invariants 2 to 7). Only after the rotation's commit does the cache
   (and so any caller) see the new access token (2, persist before publish). A refresh that is
   fenced off (ConflictError) publishes whatever the store holds now; one cancelled mid-call
   releases its lease and leaves its intent for recovery.
3. Refresh ahead of need (6): the rotation schedules each grant's next refresh; the schedule
   loop starts due refreshes with at most `max_concurrency` in flight per provider.

The schedule loop (`run`) asks the store for due grants through an index, sleeps until the
next due time (at most `POLL` seconds, to notice other processes' writes), and reloads grants
that changed in the store into the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import structlog

from broker.cache import GrantCache
from broker.config import ProviderConfig
from broker.errors import BrokerError, ConflictError
from broker.idp.http import MAX_CALL_SECONDS
from broker.metrics import Metrics
from broker.model import Grant
from broker.rotation import REPLAY_MARGIN, Rotation, TokenClient
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
FOLLOW_POLL_SECONDS = 0.05
SWEEP_SECONDS = 5.0  # how often the loop looks for deleted grants and dead owners' leases
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
        self._providers = providers
        self._policy = policy
        self._clock = clock
        self._rand = rand
        self.owner = owner or owner_id()
        self._rotation = Rotation(
            repository,
            clients=clients,
            providers=providers,
            policy=policy,
            metrics=metrics,
            clock=clock,
            rand=rand,
            owner=self.owner,
            lease=LEASE,
            # Taken from this module as the refresher is built, so that a test can move the
            # pauses between replays onto a hand clock by replacing broker.refresher.replay_delay.
            pause=replay_delay,
        )
        self._max_concurrency = max_concurrency
        self._limits: dict[str, asyncio.Semaphore] = {}  # per provider, made on first use
        self._inflight: dict[str, asyncio.Task[Grant | None]] = {}
        self._cooldown: dict[str, datetime] = {}
        self._tasks = Tasks()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False
        self.heartbeat: datetime | None = None
        # The change sequence value up to which this process has published the store's writes.
        self.seen_version = 0

    # -- single flight ---------------------------------------------------------------------

    def refresh(self, grant: Grant) -> asyncio.Task[Grant | None]:
        """The one task refreshing `grant` in this process, started if none is running."""
        task = self._inflight.get(grant.id)
        if task is None:
            task = self._tasks.spawn(
                self._refresh(grant.id, grant.provider, grant.updated_at), f"refresh {grant.name}"
            )
            self._inflight[grant.id] = task
            task.add_done_callback(lambda done: self._forget(grant.id, done))
        return task

    async def wait(self, grant: Grant, seconds: float) -> Grant | None:
        """Refresh `grant` and wait at most `seconds`; giving up never cancels the call."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.refresh(grant)), seconds)
        except TimeoutError:
            return None

    def is_rotating(self, grant_id: str) -> bool:
        """Whether this grant's refresh token is at the IdP right now."""
        return grant_id in self._rotation.rotating

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
            now = self._clock()
            self.heartbeat = now
            try:
                await self.sync()
                if time.monotonic() - last_sweep > SWEEP_SECONDS:
                    await self._break_dead_leases()
                    last_sweep = time.monotonic()
                await self._start_due(now)
                delay = await self._sleep_for(now)
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
        for due in await self._repository.due(now, DUE_BATCH, self._providers.keys()):
            if due.id in self._inflight:
                continue
            if self._cooldown.get(due.id, now) > now:
                continue
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

    def stalled(self, now: datetime) -> str | None:
        """Why the schedule loop is not healthy, or None."""
        if self._loop is None or self._loop.done():
            return "the schedule loop is not running"
        if self.heartbeat is None or now - self.heartbeat > STALL_AFTER:
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

    async def _refresh(self, grant_id: str, provider: str, seen: datetime | None) -> Grant | None:
        """Refresh one grant as the caller (or the loop) last saw it: written at `seen`."""
        limit = self._limits.setdefault(provider, asyncio.Semaphore(self._max_concurrency))
        async with limit:
            if self._stopping:  # queued behind the provider's limit when shutdown began
                return self._cache.by_id(grant_id)
            now = self._clock()
            grant = await self._repository.claim(grant_id, self.owner, now, now + LEASE)
            if grant is None and await self._break_dead_leases():
                # The holder may have been a process on this host that died mid-refresh.
                grant = await self._repository.claim(grant_id, self.owner, now, now + LEASE)
            if grant is not None:
                if grant.updated_at != seen and grant.intent_at is None:
                    # Another process wrote it since we looked (refreshed it, or failed and
                    # stored a back-off): publish, spend nothing, and let the caller decide
                    # again on what the store holds. Leases alone do not touch updated_at.
                    await self._release(grant)
                    self._cache.put(grant)
                    return grant
                return await self._run_claimed(grant)
        return await self._follow(grant_id)

    async def _run_claimed(self, grant: Grant) -> Grant | None:
        try:
            result = await self._rotation.rotate(grant)
        except asyncio.CancelledError:
            self._rotation.rotating.discard(grant.id)
            await self._release(grant)  # any open intent stays, for recovery
            raise
        except ConflictError as exc:
            self._rotation.rotating.discard(grant.id)
            # Fenced off (an admin replaced the tokens, or the lease was taken over):
            # whatever the store holds now wins.
            log.warning("refresh_fenced_off", grant=grant.name, reason=str(exc))
            await self._release(grant)
            return await self._reload(grant.id)
        except Exception:
            self._rotation.rotating.discard(grant.id)
            log.exception("refresh_failed_unexpectedly", grant=grant.name)
            self._cooldown[grant.id] = self._clock() + backoff(
                grant.refresh_failures + 1, self._policy, self._rand()
            )
            await self._release(grant)
            return None
        self._cooldown.pop(grant.id, None)
        self._cache.put(result)  # published only now, after the commit
        self._rotation.rotating.discard(grant.id)
        return result

    async def _follow(self, grant_id: str) -> Grant | None:
        """Another owner holds the lease: wait (bounded by the lease) for what it stores.

        The other owner is another process, so there is nothing to await but the store.
        """
        for _ in range(int(LEASE.total_seconds() / FOLLOW_POLL_SECONDS)):
            if not await self._repository.lease_held(grant_id, self._clock()):
                break
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
        return await self._reload(grant_id)

    async def _reload(self, grant_id: str) -> Grant | None:
        """The grant as the store holds it now, published."""
        grant = await self._repository.get_by_id(grant_id)
        if grant is not None:
            self._cache.put(grant)
        return grant

    async def _release(self, grant: Grant) -> None:
        try:
            await asyncio.shield(self._repository.release(grant.id, self.owner))
        except Exception:  # noqa: BLE001 - the lease expires by itself
            log.warning("lease_release_failed", grant=grant.name)
