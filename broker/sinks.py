"""Sink files: a grant's current access token kept in a file, for consumers that read files.

This is the convention of Vault Agent's file sink and spiffe-helper: the operator names a
grant, a path, a format, a mode and an owner (`[[sinks]]`), and the daemon keeps the file
holding the token the API would serve.

What a sink file guarantees:

- it only ever holds a committed token. Sinks hear of grants through the cache's subscribers
  (`GrantCache.subscribe`), and nothing reaches the cache before its commit, so there is no
  second "after commit" path to get wrong;
- it is replaced atomically: the content goes to a temporary file in the same directory,
  created with no permissions at all, written, given its group, then `mode`, then its owner
  (`broker.sinkfile.write_atomic`), fsynced, and renamed over the path (then the directory is
  fsynced). A reader sees the old
  file or the new one, never a part, and no file at the path is ever looser than `mode`;
- it is removed when the grant is deleted or needs a login, and when its access token expires
  before a refreshed one arrives (a timer, since expiry is a matter of time, not of a change);
  a later refresh or login writes it again;
- a write that fails (directory missing, disk full, permission) is logged with the path and
  the reason, counted as `sink_writes_total{outcome="failed"}` and retried with back-off. The
  subscriber only records the grant and wakes the sink's task, which does the file I/O in a
  thread: a sink never delays or changes a rotation.

Every node of a fleet writes the sinks of its own config from its own cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from broker.cache import GrantCache
from broker.config import SinkConfig, SinkFormat
from broker.metrics import Metrics
from broker.model import Grant, GrantState
from broker.sinkfile import describe, remove, sweep_leftovers, write_atomic
from broker.tasks import Tasks

# Back-off after failed writes: 1 s, doubling, at most 5 minutes.
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0
# How long shutdown waits for sinks to finish a write they have started.
STOP_SECONDS = 5.0
log = structlog.get_logger("broker.sinks")


def retry_delay(failures: int) -> float:
    """Seconds to wait after `failures` failed attempts in a row."""
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2.0 ** min(32, max(0, failures - 1)))


# -- what a sink file should hold (pure) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """The file should hold this generation of the grant's access token (never the token)."""

    grant_id: str
    generation: int
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Remove:
    """The file should not exist, for this reason."""

    reason: str


Target = Write | Remove


def target(grant: Grant | None, now: datetime) -> Target:
    """What a sink of `grant` should hold at `now`."""
    if grant is None:
        return Remove("the grant does not exist")
    state = grant.effective_state(now)
    if state is not GrantState.ACTIVE:
        return Remove(f"the grant is {state.value}")
    if grant.tokens.access_token is None or grant.access_ttl(now) <= 0:
        return Remove("its access token expired before a refreshed one arrived")
    return Write(grant.id, grant.generation, grant.access_expires_at)


def settled(wanted: Target, done: Target | None) -> bool:
    """Whether a file known to hold `done` already satisfies `wanted`."""
    if isinstance(wanted, Remove):
        return isinstance(done, Remove)
    return wanted == done


def render(grant: Grant, fmt: SinkFormat, now: datetime) -> bytes:
    """The file's content: the bare token, the token route's JSON body, or a header line."""
    assert grant.tokens.access_token is not None
    token = grant.tokens.access_token.reveal()
    if fmt == "token":
        return token.encode()
    if fmt == "header":
        return f"Authorization: Bearer {token}\n".encode()
    expires_at = grant.access_expires_at
    body = {
        "access_token": token,
        "token_type": grant.token_type,
        "expires_in": int(grant.access_ttl(now)),
        "expires_at": None
        if expires_at is None
        else expires_at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "scope": " ".join(grant.scopes),
        "provider": grant.provider,
        "user": grant.user,
    }
    return (json.dumps(body) + "\n").encode()


# -- one sink ---------------------------------------------------------------------------------


class SinkWriter:
    """Keeps one sink file in step with its grant: a task that wakes on each publish."""

    def __init__(
        self,
        config: SinkConfig,
        grant: Grant | None,
        *,
        clock: Callable[[], datetime],
        metrics: Metrics,
        retry: Callable[[int], float] = retry_delay,
    ) -> None:
        self.config = config
        self._grant = grant
        self._clock = clock
        self._metrics = metrics
        self._retry = retry
        self._wake = asyncio.Event()
        self._done: Target | None = None  # what the file is known to hold; None: unknown
        self._failed: Target | None = None  # what the last failed attempt wanted
        self._failures = 0
        self._not_before = 0.0  # monotonic time of the next retry of `_failed`
        self._retiring = False
        self._stopping = False

    @property
    def failures(self) -> int:
        """Failed attempts in a row, 0 once a write or removal succeeds."""
        return self._failures

    def offer(self, grant: Grant | None) -> None:
        """The cache's newest entry for this sink's grant; never blocks."""
        self._grant = grant
        self._wake.set()

    @property
    def retiring(self) -> bool:
        """Whether the sink left the config and its file is being removed."""
        return self._retiring

    def reconfigure(self, config: SinkConfig) -> None:
        """New settings for the same path (or the sink is back): the file is written again."""
        self.config = config
        self._retiring = False
        self._done = None
        self._failed = None
        self._wake.set()

    def retire(self) -> None:
        """Remove the file (the sink left the config), then end."""
        self._retiring = True
        self._wake.set()

    def stop(self) -> None:
        """Finish what is due now (a file in step with the newest commit), then end."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Until retired or stopped: bring the file in step whenever something changes."""
        await asyncio.to_thread(sweep_leftovers, self.config.path)
        while True:
            self._wake.clear()
            grant, now = self._grant, self._clock()
            wanted: Target = (
                Remove("the sink was removed from the config")
                if self._retiring
                else target(grant, now)
            )
            if not settled(wanted, self._done) and self._may_try(wanted):
                await self._apply(wanted, grant, now)
                if self._wake.is_set():
                    continue  # a newer commit (or a stop) came meanwhile: look again first
            if self._stopping or (self._retiring and settled(wanted, self._done)):
                return
            timeout = self._next_change(wanted, now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _failed_with(self, wanted: Target, exc: Exception, *, current: bool) -> None:
        self._failures += 1
        delay = self._retry(self._failures)
        if current:  # a failure under settings since replaced says nothing of the new ones
            self._failed = wanted
            self._not_before = time.monotonic() + delay
        self._metrics.sink_writes.labels(outcome="failed").inc()
        log.error(
            "sink_write_failed",
            path=str(self.config.path),
            grant=self.config.grant,
            action="write" if isinstance(wanted, Write) else "remove",
            reason=describe(exc),
            failures=self._failures,
            retry_in_s=round(delay, 3),
        )

    def _may_try(self, wanted: Target) -> bool:
        """Not while backing off from a failure of this same target; a new one is tried now."""
        return wanted != self._failed or time.monotonic() >= self._not_before

    def _next_change(self, wanted: Target, now: datetime) -> float | None:
        """Seconds until the sink must act without being told: a retry, or the token's expiry."""
        moments: list[float] = []
        if self._failed is not None and not settled(wanted, self._done):
            moments.append(self._not_before - time.monotonic())
        if isinstance(wanted, Write) and wanted.expires_at is not None:
            moments.append((wanted.expires_at - now).total_seconds())
        return max(0.0, min(moments)) if moments else None

    async def _apply(self, wanted: Target, grant: Grant | None, now: datetime) -> None:
        config = self.config
        try:
            if isinstance(wanted, Write):
                assert grant is not None
                data = render(grant, config.format, now)
                await asyncio.to_thread(
                    write_atomic, config.path, data, config.mode, config.owner, config.group
                )
                changed = True
            else:
                changed = await asyncio.to_thread(remove, config.path)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the sink retries; it never dies
            self._failed_with(wanted, exc, current=config is self.config)
            return
        recovered = self._failures
        if config is self.config:
            self._done, self._failed, self._failures = wanted, None, 0
        # else: reconfigured meanwhile; the file holds the old settings and is written again.
        if isinstance(wanted, Write):
            self._metrics.sink_writes.labels(outcome="written").inc()
            log.info(
                "sink_written",
                path=str(config.path),
                grant=config.grant,
                generation=wanted.generation,
                **({"after_failures": recovered} if recovered else {}),
            )
        elif changed:
            self._metrics.sink_writes.labels(outcome="removed").inc()
            log.info("sink_removed", path=str(config.path), grant=config.grant, why=wanted.reason)


# -- every sink of the config -----------------------------------------------------------------


class Sinks:
    """The configured sinks: subscribed to the cache, one writer task per path."""

    def __init__(
        self,
        configs: Iterable[SinkConfig],
        *,
        cache: GrantCache,
        clock: Callable[[], datetime],
        metrics: Metrics,
        retry: Callable[[int], float] = retry_delay,
    ) -> None:
        self._configs = tuple(configs)
        self._cache = cache
        self._clock = clock
        self._metrics = metrics
        self._retry = retry
        self._tasks = Tasks()
        self._writers: dict[Path, SinkWriter] = {}
        self._running: dict[SinkWriter, asyncio.Task[None]] = {}
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        """Write every sink from the cache as it stands, and follow its changes."""
        self._unsubscribe = self._cache.subscribe(self.publish)
        self.replace(self._configs)

    def writer(self, path: Path) -> SinkWriter | None:
        """The writer of the sink at `path`, if one is configured."""
        return self._writers.get(path)

    def publish(self, before: Grant | None, after: Grant | None) -> None:
        """The cache subscriber: hand the newest entry to the grant's sinks (never blocks)."""
        grant = after or before
        if grant is None:
            return
        name = grant.name
        for writer in self._writers.values():
            if writer.config.grant == name:
                writer.offer(after)

    def replace(self, configs: Iterable[SinkConfig]) -> None:
        """Apply a (re)loaded config: new sinks start, removed ones delete their file and end.

        Synchronous, so a reload swaps everything in one step of the event loop. A path keeps
        one writer while its file is being removed, so a sink taken out and put back at once
        never has two tasks racing on one file.
        """
        wanted = {config.path: config for config in configs}
        for path, writer in self._writers.items():
            if path not in wanted:
                writer.retire()
        for path, config in wanted.items():
            current = self._writers.get(path)
            if current is not None and current in self._running:
                if current.retiring or current.config != config:
                    current.reconfigure(config)
                continue
            writer = SinkWriter(
                config,
                self._cache.get(config.provider, config.user),
                clock=self._clock,
                metrics=self._metrics,
                retry=self._retry,
            )
            self._writers[path] = writer
            task = self._tasks.spawn(writer.run(), f"sink {path}")
            self._running[writer] = task
            task.add_done_callback(functools.partial(self._ended, writer))
        self._configs = tuple(wanted.values())

    def _ended(self, writer: SinkWriter, _task: asyncio.Task[None]) -> None:
        self._running.pop(writer, None)
        if self._writers.get(writer.config.path) is writer and writer.retiring:
            del self._writers[writer.config.path]

    async def stop(self) -> None:
        """Stop following the cache; let each sink catch up with the newest commit (bounded)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        for writer in self._running:
            writer.stop()
        running = list(self._running.values())
        if running:
            await asyncio.wait(running, timeout=STOP_SECONDS)
        await self._tasks.cancel_all()

    def __len__(self) -> int:
        return sum(1 for writer in self._writers.values() if not writer.retiring)
