"""Grant counts by provider and state, and the least access-token life, kept as the cache changes.

The STATUS= line and the grant gauges need these every few seconds; counting 100,000 cached
grants each time would make an idle broker's CPU grow with its store. The tally subscribes to
the cache and moves one count per change instead, so a reading costs the number of providers.

Two things in a reading depend on the time, not only on what is cached:

- an active grant without a refresh token is seen as `reauth_required` once its access token
  has expired (`Grant.effective_state`). Such grants are rare (a login whose provider gave no
  refresh token); they are kept aside and judged at each reading;
- the least remaining life per provider comes from a heap of expiry times per provider, whose
  superseded entries are dropped when they reach the top (as in `broker.agenda`). It covers the
  grants a refresh keeps alive: one without a refresh token runs out by design (netID issues
  none), and counting it would hold the gauge low, and its alert firing, with nothing wrong.

`GrantTally.gauges(now)` equals counting every grant at `now`; the tests hold it to that.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

from broker.metrics import GrantGauges
from broker.model import Grant, GrantState

# An active grant with no access token (or none with a known expiry) has no life left.
_NO_LIFE = datetime.min.replace(tzinfo=UTC)


def _mortal(grant: Grant) -> bool:
    """Whether `grant`'s state as callers see it can change with time alone."""
    return grant.state is GrantState.ACTIVE and grant.tokens.refresh_token is None


def _expiry(grant: Grant) -> datetime:
    if grant.tokens.access_token is None or grant.access_expires_at is None:
        return _NO_LIFE
    return grant.access_expires_at


class GrantTally:
    """Counts by (provider, state) and least access-token life per provider; see the module."""

    def __init__(self, lookup: Callable[[str], Grant | None]) -> None:
        self._lookup = lookup  # the cached grant by row id: tells a heap entry is current
        self._counts: Counter[tuple[str, str]] = Counter()  # grants that are not mortal
        self._mortal: dict[str, Grant] = {}  # grant id -> active grant without refresh token
        self._expiries: dict[str, list[tuple[datetime, str]]] = {}  # provider -> heap

    def update(self, before: Grant | None, after: Grant | None) -> None:
        """The cache changed `before` into `after` (either may be None); a cache subscriber."""
        if before is not None and self._mortal.pop(before.id, None) is None:
            key = (before.provider, before.state.value)
            self._counts[key] -= 1
            if not self._counts[key]:
                del self._counts[key]
        if after is None:
            return
        if _mortal(after):
            self._mortal[after.id] = after
            return
        self._counts[(after.provider, after.state.value)] += 1
        if after.state is GrantState.ACTIVE:
            heap = self._expiries.setdefault(after.provider, [])
            heapq.heappush(heap, (_expiry(after), after.id))
            if len(heap) > 2 * self._counts[(after.provider, GrantState.ACTIVE.value)] + 64:
                heap[:] = [entry for entry in heap if self._holds(entry)]
                heapq.heapify(heap)

    def _holds(self, entry: tuple[datetime, str]) -> bool:
        """Whether a heap entry is the current expiry of an active, counted grant."""
        at, grant_id = entry
        grant = self._lookup(grant_id)
        return (
            grant is not None
            and grant.state is GrantState.ACTIVE
            and not _mortal(grant)
            and _expiry(grant) == at
        )

    def _least_expiry(self, provider: str) -> datetime | None:
        heap = self._expiries.get(provider)
        while heap:
            if self._holds(heap[0]):
                return heap[0][0]
            heapq.heappop(heap)  # superseded or gone
        return None

    def gauges(self, now: datetime) -> GrantGauges:
        """Counts by provider and state at `now`, and the least access-token life per provider."""
        by_state = Counter(self._counts)
        least: dict[str, datetime] = {}
        for provider in {provider for provider, _ in by_state} | set(self._expiries):
            at = self._least_expiry(provider)
            if at is not None:
                least[provider] = at
        for grant in self._mortal.values():  # counted, but not in the least life (above)
            by_state[(grant.provider, grant.effective_state(now).value)] += 1
        min_ttl = {
            provider: 0.0 if at == _NO_LIFE else max(0.0, (at - now).total_seconds())
            for provider, at in least.items()
        }
        return GrantGauges(by_state=dict(by_state), min_ttl=min_ttl)
