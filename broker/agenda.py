"""When each grant is next to be refreshed, kept in memory from what the cache publishes.

The schedule loop sleeps until the earliest entry, instead of asking the store every second:
an idle broker with 100,000 grants does nothing until one comes due. The cache subscribes the
agenda (`update`), so every publish (a refresh here, a change another broker made and the
follower read, a login, a deletion) moves the grant's entry; entries are never removed from the
heap, only superseded (the version they were made for no longer matches), and dropped when met.

What "due" means for a grant as cached:

- active with a refresh token: at its `next_refresh_at`;
- with an open intent (someone claimed it: this broker, another one, or one that died): not
  before `RECHECK` after that claim was written; a live owner has finished by then (and its
  write supersedes the entry), a dead one's claim is then taken over; nor before its
  `next_refresh_at`, which a recovery that has to wait moves later;
- anything else (a grant that needs a login, or has no refresh token): never.

Pure: no I/O, no clock reads; times are the ones the grants carry.
"""

from __future__ import annotations

import heapq
from datetime import datetime, timedelta

from broker.model import Grant, GrantState

RECHECK = timedelta(seconds=1)


def due_at(grant: Grant) -> datetime | None:
    """When `grant` (as cached) should next be claimed for a refresh; None: never."""
    if grant.state is not GrantState.ACTIVE or grant.tokens.refresh_token is None:
        return None
    if grant.intent_at is not None:
        recheck = max(grant.intent_at, grant.updated_at or grant.intent_at) + RECHECK
        return max(recheck, grant.next_refresh_at or recheck)
    return grant.next_refresh_at


class Agenda:
    """Grants by due time (see the module docstring)."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, str, int]] = []
        self._current: dict[str, tuple[datetime, int]] = {}  # grant id -> (due, version)

    def update(self, before: Grant | None, after: Grant | None) -> None:
        """The cache changed `before` into `after` (either may be None)."""
        if after is None:
            if before is not None:
                self._current.pop(before.id, None)
            return
        at = due_at(after)
        if at is None:
            self._current.pop(after.id, None)
            return
        self.put(after.id, at, after.version)

    def put(self, grant_id: str, at: datetime, version: int) -> None:
        """Have `grant_id` (at `version`) come due at `at`."""
        self._current[grant_id] = (at, version)
        heapq.heappush(self._heap, (at, grant_id, version))

    def next_at(self) -> datetime | None:
        """The earliest due time, or None when nothing is scheduled."""
        while self._heap:
            at, grant_id, version = self._heap[0]
            if self._current.get(grant_id) == (at, version):
                return at
            heapq.heappop(self._heap)  # superseded
        return None

    def take_due(self, now: datetime, limit: int) -> list[tuple[str, int]]:
        """Up to `limit` grants due at `now`, earliest first, as (id, version); each is off the
        agenda until it is put back or published again."""
        taken: list[tuple[str, int]] = []
        while len(taken) < limit and (at := self.next_at()) is not None and at <= now:
            _, grant_id, version = heapq.heappop(self._heap)
            del self._current[grant_id]
            taken.append((grant_id, version))
        return taken

    def __len__(self) -> int:
        return len(self._current)
