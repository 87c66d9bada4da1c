"""The in-memory view of grants that the token path answers from, without a query per request.

Entries are whole `Grant` values. A write replaces an entry only with a newer version of the
row: a higher generation, or at one generation a higher `version` (the store's change sequence,
stamped on every write). Wall-clock time never orders two writes (ROTATION.md invariant 9), so
an update that lost a race, arrives late from a slower task, or was stamped before a clock step
can never put an older token, or an older state, back in front of callers.

The cache is also the one place a committed grant is announced: every put that changes what is
cached, and every drop, calls each subscriber with the entry before and after (`None` for
absent). Subscribers run synchronously inside `put`/`drop` and must not block: they set events,
wake waiters or queue work. Nothing is ever put before its own commit, so a subscriber never
sees a token that is not durable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from broker.model import Grant

Subscriber = Callable[[Grant | None, Grant | None], None]


class GrantCache:
    """Grants by (provider, user), newest version wins; changes announced to subscribers."""

    def __init__(self) -> None:
        self._grants: dict[tuple[str, str], Grant] = {}
        self._ids: dict[str, tuple[str, str]] = {}
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber(before, after)` on every change; returns the unsubscribe function."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def get(self, provider: str, user: str) -> Grant | None:
        """The cached grant, or None."""
        return self._grants.get((provider, user))

    def put(self, grant: Grant) -> bool:
        """Cache `grant` unless a newer version of the same row is already there."""
        key = (grant.provider, grant.user)
        current = self._grants.get(key)
        if current is not None and current.id == grant.id and not newer(grant, current):
            return False
        if current is not None and current.id != grant.id:
            self._ids.pop(current.id, None)
        self._grants[key] = grant
        self._ids[grant.id] = key
        self._announce(current, grant)
        return True

    def by_id(self, grant_id: str) -> Grant | None:
        """The cached grant with this row id, or None."""
        key = self._ids.get(grant_id)
        return None if key is None else self._grants.get(key)

    def drop(self, provider: str, user: str) -> None:
        """Forget a grant (it was deleted)."""
        grant = self._grants.pop((provider, user), None)
        if grant is not None:
            self._ids.pop(grant.id, None)
            self._announce(grant, None)

    def _announce(self, before: Grant | None, after: Grant | None) -> None:
        # Every subscriber hears of the change even if one of them fails; the first failure
        # is raised afterwards, to whoever published, which logs it. The entry stays changed.
        failure: Exception | None = None
        for subscriber in list(self._subscribers):
            try:
                subscriber(before, after)
            except Exception as exc:  # noqa: BLE001 - re-raised below, once all have run
                failure = failure or exc
        if failure is not None:
            raise failure

    def __iter__(self) -> Iterator[Grant]:
        return iter(list(self._grants.values()))

    def __len__(self) -> int:
        return len(self._grants)


def newer(candidate: Grant, current: Grant) -> bool:
    """Whether `candidate` is a later write of the row than `current`.

    The generation decides; at one generation (a failed refresh records its outcome without a
    new generation) the store's change sequence does. A candidate that is the very same write
    (same generation and version) is not newer: publishing it again changes nothing.
    """
    if candidate.generation != current.generation:
        return candidate.generation > current.generation
    return candidate.version > current.version
