"""A mapping whose whole content a config reload replaces in one step.

The services keep a reference to one `LiveMap` and read it at each use; `replace` swaps the
content with a single assignment, so no reader on the event loop ever sees half of an old
config and half of a new one. Whoever already holds a value (a refresh at the IdP holding its
provider client) keeps it until done.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LiveMap(Mapping[K, V]):
    """A read-only view whose content is replaced atomically."""

    def __init__(self, data: Mapping[K, V]) -> None:
        self._data = dict(data)

    def replace(self, data: Mapping[K, V]) -> None:
        """Serve `data` from now on."""
        self._data = dict(data)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"LiveMap({sorted(map(str, self._data))})"
