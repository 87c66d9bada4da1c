"""Keeping this broker's cache current with the shared store, within milliseconds.

Writes by anyone (another broker of a fleet, another process on the host, a command-line tool)
reach this broker's cache through `sync`, which reads the store's change sequence past the last
version seen and publishes what it finds, in version order (ROTATION.md invariant 9: versions,
never clocks). What triggers a sync:

- a notice from PostgreSQL's LISTEN/NOTIFY feed (broker.store.feed), the moment a write commits;
  the notice alone already tells the token path that the grant has a newer version than the one
  cached (`behind`), so its callers wait for the new token instead of being served the old one;
- polling, as the fallback: every POLL seconds while no feed is connected (SQLite, or a feed
  reconnecting), every SAFETY_POLL seconds while one is, and every FAST_POLL seconds on SQLite
  while other processes share the store or a caller waits for another process's refresh. A
  broker alone on a SQLite store first compares the store's files with the last read (`probe`)
  and queries only when they moved, or SAFETY_POLL seconds have passed.

This broker's own writes need no reading back: a write published here at the version right
after the last one seen moves `seen_version` past it (`_published`).

A claim is announced before its refresh token leaves (`announced`): on PostgreSQL the owner
waits for its own notice to come back (when the server has delivered it to this broker, it has
sent it to every other listener); on SQLite shared by several processes, for two of their
polls. `fleet_change_lag_seconds` measures, for each write made elsewhere, the time from its
commit (its stamp, by the store's clock) to its publication here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime

import structlog

from broker.cache import GrantCache
from broker.errors import StoreError
from broker.metrics import Metrics
from broker.model import Grant
from broker.store.feed import PgListener
from broker.store.repository import GrantRepository
from broker.tasks import Tasks, wait_event

POLL = 1.0
SAFETY_POLL = 5.0
FAST_POLL = 0.05
ECHO_WAIT = 0.1  # at most this long for a claim's notice to come back before sending
LATE = 1.0  # seconds: a change that took longer than this to arrive here is logged
SYNC_PAGE = 2000  # rows read (and opened) at once when catching up with the store
log = structlog.get_logger("broker.follower")


class Follower:
    """This process's view of the store's change sequence (see the module docstring)."""

    def __init__(
        self,
        repository: GrantRepository,
        cache: GrantCache,
        metrics: Metrics,
        clock: Callable[[], datetime],
        *,
        listener: PgListener | None = None,
        shared: Callable[[], bool] = lambda: False,
        probe: Callable[[], object] | None = None,
    ) -> None:
        self._repository = repository
        self._cache = cache
        self._metrics = metrics
        self._clock = clock
        self._listener = listener
        self._shared = shared  # whether other live brokers share the store now
        self._probe = probe  # a fingerprint of the store's files (SQLite): unchanged, no query
        self._probed: object = None
        self._read_at = 0.0  # monotonic time of the last sync that read the store
        self._notices: dict[str, int] = {}  # grant id -> newest version announced
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._syncing: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        self._tasks = Tasks()
        self.seen_version = 0
        self.loaded = False  # the first sync (everything) is not a change made elsewhere
        cache.subscribe(self._published)
        if listener is not None:
            listener.on_connect = self._poke.set
            listener.on_notice = self.notice

    # -- hints from the feed ----------------------------------------------------------------

    def notice(self, grant_id: str, version: int, _deleted: bool) -> None:
        """A write of `grant_id` at `version` committed somewhere: read it soon."""
        if version > self.seen_version and version > self._notices.get(grant_id, 0):
            self._notices[grant_id] = version
        self._poke.set()

    def behind(self, grant: Grant) -> bool:
        """Whether a newer version of `grant` than the cached one is known to exist."""
        return self._notices.get(grant.id, 0) > grant.version

    def _published(self, before: Grant | None, after: Grant | None) -> None:
        grant = after or before
        if grant is None:
            return
        if after is not None and after.version == self.seen_version + 1:
            # The next version of the sequence, published here (this broker's own write, or
            # the read in progress): nothing before it is unseen, so the next read starts
            # after it rather than reading this broker's own writes back. A write whose
            # version does not follow on leaves the sequence to be read as before.
            self.seen_version = after.version
        if after is None or self._notices.get(grant.id, 0) <= after.version:
            self._notices.pop(grant.id, None)
        for future in self._waiters.pop(grant.id, []):
            if not future.done():
                future.set_result(None)

    # -- following --------------------------------------------------------------------------

    async def sync(self) -> None:
        """Publish what anyone wrote or deleted since the last version seen, a page at a
        time (a first load of many grants never holds all their rows at once)."""
        if self._probe is not None:  # taken before the read: a commit during it shows later
            self._probed, self._read_at = self._probe(), time.monotonic()
            # The files moved, often by a write that is no grant's (a heartbeat): one look at
            # the sequence says whether there is anything to read.
            if self.loaded and await self._repository.last_version() <= self.seen_version:
                return
        while await self._sync_page():
            pass
        self.loaded = True

    async def _sync_page(self) -> bool:
        """Publish one page of changes; whether more follow."""
        changes = await self._repository.changes_since(self.seen_version, SYNC_PAGE)
        now = self._clock()
        for grant in changes.written:
            if self._cache.put(grant) and self.loaded and grant.updated_at is not None:
                # New here, so written elsewhere: how long it took to arrive.
                lag = (now - grant.updated_at).total_seconds()
                self._metrics.fleet_change_lag.observe(max(0.0, lag))
                if lag > LATE:
                    log.info(
                        "change_arrived_late",
                        grant=grant.name,
                        version=grant.version,
                        lag_s=round(lag, 3),
                        feed=self._listener is not None and self._listener.connected,
                    )
        for gone in changes.deleted:
            cached = self._cache.get(gone.provider, gone.user)
            if cached is not None and cached.id == gone.grant_id:
                self._cache.drop(gone.provider, gone.user)
            self._notices.pop(gone.grant_id, None)
        self.seen_version = max(self.seen_version, changes.version)
        return changes.more

    async def sync_now(self) -> None:
        """One `sync` shared by everyone asking at once; a store that cannot answer is not an
        error here (the caller keeps what it has)."""
        if self._syncing is None or self._syncing.done():
            self._syncing = self._tasks.spawn(self.sync(), "sync")
        with contextlib.suppress(StoreError):
            await asyncio.shield(self._syncing)

    def poll_interval(self) -> float:
        """How long the follower may go without reading the sequence now."""
        if self._waiters:
            return FAST_POLL
        if self._listener is not None and self._listener.connected:
            return SAFETY_POLL
        return FAST_POLL if self._shared() else POLL

    def _unchanged(self) -> bool:
        """Whether the store's files show no commit since the last read (and that read is
        recent enough to trust the fingerprint); always False without a probe.

        Not used while other brokers share the store: two commits within one tick of the
        file system's clock, into a log of unchanged size, leave the same fingerprint, and a
        peer's claim must be seen within a poll or two (`announced`); the fingerprint then
        saves nothing but the queries of an idle single broker.
        """
        if self._probe is None or self._shared():
            return False
        probed, self._probed = self._probed, self._probe()
        return probed == self._probed and time.monotonic() - self._read_at < SAFETY_POLL

    async def run(self, on_change: Callable[[], None]) -> None:
        """Follow the store until cancelled; `on_change` after each sync that published."""
        while True:
            poked = await wait_event(self._poke, self.poll_interval())
            self._poke.clear()
            if not poked and not self._waiters and self._unchanged():
                continue
            before = self.seen_version
            await self.sync_now()
            if self.seen_version != before:
                on_change()

    async def stop(self) -> None:
        """Stop the syncs in flight."""
        await self._tasks.cancel_all()

    # -- waiting ----------------------------------------------------------------------------

    async def wait_for_change(self, grant: Grant, seconds: float) -> None:
        """Wait at most `seconds` until a newer version of `grant` than this one is published
        here (following the store closely meanwhile)."""
        current = self._cache.by_id(grant.id)
        if seconds <= 0 or current is None or current.version != grant.version:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(grant.id, []).append(future)
        self._poke.set()
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(future), min(FAST_POLL, left))
                except TimeoutError:
                    await self.sync_now()
                else:
                    return
        finally:
            waiting = self._waiters.get(grant.id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(grant.id, None)

    async def announced(self, grant: Grant) -> None:
        """Return once other brokers sharing the store have very likely seen this claim."""
        if not self._shared():
            return
        if self._listener is not None and self._listener.connected:
            if not await self._listener.echo(grant.id, grant.version, ECHO_WAIT):
                log.debug("claim_echo_late", grant=grant.name)
            return
        await asyncio.sleep(2 * FAST_POLL)
