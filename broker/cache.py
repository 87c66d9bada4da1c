"""The in-memory view of grants that the token path answers from, without a query per request.

Entries are whole `Grant` values. A write replaces an entry only with a newer generation, so
an update that lost a race (or arrives late from a slower task) can never put an older token
back in front of callers.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.model import Grant


class GrantCache:
    """Grants by (provider, user), newest generation wins."""

    def __init__(self) -> None:
        self._grants: dict[tuple[str, str], Grant] = {}

    def get(self, provider: str, user: str) -> Grant | None:
        """The cached grant, or None."""
        return self._grants.get((provider, user))

    def put(self, grant: Grant) -> bool:
        """Cache `grant` unless a newer generation of the same row is already there."""
        key = (grant.provider, grant.user)
        current = self._grants.get(key)
        if current is not None and current.id == grant.id and current.generation > grant.generation:
            return False
        self._grants[key] = grant
        return True

    def drop(self, provider: str, user: str) -> None:
        """Forget a grant (it was deleted)."""
        self._grants.pop((provider, user), None)

    def __iter__(self) -> Iterator[Grant]:
        return iter(list(self._grants.values()))

    def __len__(self) -> int:
        return len(self._grants)
