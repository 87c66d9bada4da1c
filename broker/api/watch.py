"""Change notification on the token route: ETags, If-None-Match, and requests held for `wait`.

Every 200 of `GET /v1/tokens/...` carries an ETag made of the grant's row id and generation,
never of a token: the generation moves exactly when the served token changes (a committed
refresh, a new login or import over the grant), and the row id tells a deleted and re-created
grant apart. A request whose `If-None-Match` names the current tag is answered 304 at once,
or, with `wait=SECONDS`, held until a new token is served (200) or the wait ends (304).

Held requests cost nothing while they wait: each is an `asyncio.Event` in a table keyed by
grant, and `Watches.publish`, a subscriber of the grant cache, sets the events of a grant
whose generation, row or state changed, on the same publish that updates the cache (so a
held request never sees an uncommitted token). A woken request asks the grant service again,
exactly as a new request would, and goes back to waiting if the tag is still the caller's.
It also wakes when the token it holds expires, to answer what a new request would get then.

Each caller may hold `max_per_caller` requests at once; one more is 429 with Retry-After. A
client that disconnects frees its slot at once (`server.on_disconnect`), and shutdown answers
every held request 304 before the listeners drain (aiohttp's on_shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime

from aiohttp import web

from broker.api.server import on_disconnect
from broker.errors import TooManyHeld
from broker.model import Grant

MAX_WAIT_SECONDS = 300
MAX_HELD_PER_CALLER = 1000


def etag(grant: Grant) -> str:
    """The strong entity tag of the token this grant serves."""
    return f'"{grant.id[:16]}.{grant.generation}"'


def matches(condition: str, tag: str) -> bool:
    """Whether an If-None-Match value names `tag` (weak comparison, RFC 9110 13.1.2)."""
    if condition.strip() == "*":
        return True
    for candidate in condition.split(","):
        value = candidate.strip().removeprefix("W/")
        if value == tag:
            return True
    return False


class Held:
    """One held request: an event that a publish, a disconnect or shutdown sets."""

    __slots__ = ("event", "gone")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.gone = False

    def disconnected(self) -> None:
        """The client went away: stop waiting for it."""
        self.gone = True
        self.event.set()


class Watches:
    """The held token requests, by grant; the cache subscriber that wakes them."""

    def __init__(self, max_per_caller: int = MAX_HELD_PER_CALLER) -> None:
        self.max_per_caller = max_per_caller
        self.closing = False
        self._held: dict[tuple[str, str], set[Held]] = {}
        self._per_caller: Counter[str] = Counter()

    def publish(self, before: Grant | None, after: Grant | None) -> None:
        """Wake the requests held on this grant if what it serves may have changed."""
        if (
            before is not None
            and after is not None
            and before.id == after.id
            and before.generation == after.generation
            and before.state is after.state
        ):
            return  # an intent, a lease, a back-off: the same token, nothing to answer
        grant = after or before
        if grant is None:
            return
        for held in self._held.get((grant.provider, grant.user), ()):
            held.event.set()

    @contextlib.contextmanager
    def hold(self, provider: str, user: str, caller: str) -> Iterator[Held]:
        """A slot for one held request of `caller`, freed on exit; TooManyHeld past the limit."""
        if self._per_caller[caller] >= self.max_per_caller:
            raise TooManyHeld(
                f"caller {caller} already holds {self.max_per_caller} waiting token requests; "
                "let one end before starting another"
            )
        held = Held()
        key = (provider, user)
        self._held.setdefault(key, set()).add(held)
        self._per_caller[caller] += 1
        try:
            yield held
        finally:
            waiting = self._held[key]
            waiting.discard(held)
            if not waiting:
                del self._held[key]
            self._per_caller[caller] -= 1
            if not self._per_caller[caller]:
                del self._per_caller[caller]

    async def close(self, _app: web.Application | None = None) -> None:
        """Answer every held request now and hold no more (shutdown)."""
        self.closing = True
        for waiting in self._held.values():
            for held in waiting:
                held.event.set()

    def held_by(self, caller: str) -> int:
        """How many requests `caller` holds now."""
        return self._per_caller[caller]

    def __len__(self) -> int:
        return sum(self._per_caller.values())


async def next_token(
    request: web.Request,
    watches: Watches,
    grant: Grant,
    *,
    condition: str,
    seconds: int,
    caller: str,
    clock: Callable[[], datetime],
    fetch: Callable[[], Awaitable[Grant]],
) -> Grant:
    """Hold the request until `fetch` serves a grant whose tag `condition` does not name, or
    `seconds` pass, the client leaves or the daemon stops; the grant to answer with."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with watches.hold(grant.provider, grant.user, caller) as held:
        cancel = on_disconnect(request, held.disconnected)
        try:
            while not (held.gone or watches.closing):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                expires = _until_expiry(grant, clock())
                woke = True
                try:
                    async with asyncio.timeout(min(remaining, expires or remaining)):
                        await held.event.wait()
                except TimeoutError:
                    woke = expires is not None and expires < remaining
                held.event.clear()
                if not woke or held.gone or watches.closing:
                    break
                grant = await fetch()
                if not matches(condition, etag(grant)):
                    break
        finally:
            cancel()
    return grant


def _until_expiry(grant: Grant, now: datetime) -> float | None:
    """Seconds until the grant's access token expires; None once it has (no busy wake-ups)."""
    if grant.access_expires_at is None:
        return None
    seconds = (grant.access_expires_at - now).total_seconds()
    return seconds if seconds > 0 else None
