"""The in-memory view of grants that the token path answers from, without a query per request.

Entries are whole `Grant` values. A write replaces an entry only with a newer generation (or,
at one generation, a later write), so an update that lost a race or arrives late from a slower
task can never put an older token, or an older state, back in front of callers.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.model import Grant


class GrantCache:
    """Grants by (provider, user), newest generation wins."""

    def __init__(self) -> None:
        self._grants: dict[tuple[str, str], Grant] = {}
        self._ids: dict[str, tuple[str, str]] = {}

    def get(self, provider: str, user: str) -> Grant | None:
        """The cached grant, or None."""
        return self._grants.get((provider, user))

    def put(self, grant: Grant) -> bool:
        """Cache `grant` unless a newer generation of the same row is already there."""
        key = (grant.provider, grant.user)
        current = self._grants.get(key)
        if current is not None and current.id == grant.id and _newer(current, grant):
            return False
        if current is not None and current.id != grant.id:
            self._ids.pop(current.id, None)
        self._grants[key] = grant
        self._ids[grant.id] = key
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

    def __iter__(self) -> Iterator[Grant]:
        return iter(list(self._grants.values()))

    def __len__(self) -> int:
        return len(self._grants)


def _newer(current: Grant, candidate: Grant) -> bool:
    """Whether `current` is a later write of the row than `candidate`.

    The generation decides; at one generation (a failed refresh records its outcome without a
    new generation) the later write does, so a row read before the outcome cannot undo it.
    """
    if current.generation != candidate.generation:
        return current.generation > candidate.generation
    if current.updated_at is None or candidate.updated_at is None:
        return False
    return current.updated_at > candidate.updated_at
