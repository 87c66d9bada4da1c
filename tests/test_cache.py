"""Tests for broker.cache: the newest generation of a row wins; a new row replaces an old one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.cache import GrantCache
from broker.model import Grant, GrantState, Secret, TokenSet


def _grant(row_id: str, generation: int, access: str, user: str = "alice") -> Grant:
    return Grant(
        id=row_id,
        provider="techniek",
        user=user,
        state=GrantState.ACTIVE,
        generation=generation,
        tokens=TokenSet(refresh_token=Secret(f"rt-{access}"), access_token=Secret(access)),
    )


def _access(grant: Grant | None) -> str | None:
    if grant is None or grant.tokens.access_token is None:
        return None
    return grant.tokens.access_token.reveal()


def test_put_keeps_the_newest_generation(new_secret: Callable[[str], str]) -> None:
    """Putting generation 2 after generation 1 of the same row serves generation 2."""
    first, second = new_secret("at"), new_secret("at")
    cache = GrantCache()
    assert cache.put(_grant("row-1", 1, first))
    assert cache.put(_grant("row-1", 2, second))
    cached = cache.get("techniek", "alice")
    assert cached is not None
    assert cached.generation == 2
    assert _access(cached) == second


def test_an_older_generation_never_replaces_a_newer_one(new_secret: Callable[[str], str]) -> None:
    """A late write of generation 2 is refused once generation 3 of the same row is cached."""
    newer, older = new_secret("at"), new_secret("at")
    cache = GrantCache()
    cache.put(_grant("row-1", 3, newer))
    assert not cache.put(_grant("row-1", 2, older))
    cached = cache.get("techniek", "alice")
    assert cached is not None
    assert cached.generation == 3
    assert _access(cached) == newer


def test_a_new_row_replaces_the_old_row_whatever_its_generation(
    new_secret: Callable[[str], str],
) -> None:
    """A grant deleted and created again (new row id, generation 1) replaces generation 7."""
    old, recreated = new_secret("at"), new_secret("at")
    cache = GrantCache()
    cache.put(_grant("row-old", 7, old))
    assert cache.put(_grant("row-new", 1, recreated))
    cached = cache.get("techniek", "alice")
    assert cached is not None
    assert (cached.id, cached.generation) == ("row-new", 1)
    assert _access(cached) == recreated


def test_drop_forgets_only_that_grant(new_secret: Callable[[str], str]) -> None:
    """Dropping a grant removes it and leaves the others; dropping a missing one is harmless."""
    cache = GrantCache()
    cache.put(_grant("row-a", 1, new_secret("at"), user="alice"))
    cache.put(_grant("row-b", 1, new_secret("at"), user="bob"))
    cache.drop("techniek", "alice")
    cache.drop("techniek", "nobody")
    assert cache.get("techniek", "alice") is None
    assert cache.get("techniek", "bob") is not None
    assert len(cache) == 1
    assert [grant.user for grant in cache] == ["bob"]


def test_grants_are_keyed_by_provider_and_user(new_secret: Callable[[str], str]) -> None:
    """The same user at two providers is two entries."""
    cache = GrantCache()
    cache.put(_grant("row-a", 1, new_secret("at")))
    cache.put(replace(_grant("row-b", 1, new_secret("at")), provider="netid"))
    assert cache.get("techniek", "alice") is not None
    assert cache.get("netid", "alice") is not None
    assert cache.get("netid", "bob") is None
    assert len(cache) == 2


def test_at_one_generation_the_higher_version_wins_whatever_the_wall_clock_says(
    new_secret: Callable[[str], str],
) -> None:
    """A later write of one generation (a stored back-off) replaces the earlier one even when a
    clock step back stamped it with an earlier time, and the earlier one cannot come back."""
    access = new_secret("at")
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    first = replace(_grant("row-1", 4, access), version=10, updated_at=now)
    stepped_back = replace(first, version=11, updated_at=now - timedelta(minutes=10))
    stepped_back = replace(stepped_back, last_error="backing off")
    cache = GrantCache()
    cache.put(first)
    assert cache.put(stepped_back)
    assert not cache.put(first)
    cached = cache.get("techniek", "alice")
    assert cached is not None
    assert cached.version == 11
    assert cached.last_error == "backing off"


def test_the_same_write_published_twice_is_announced_once(
    new_secret: Callable[[str], str],
) -> None:
    """Subscribers hear of each change once: a repeated put of the same version is no change."""
    grant = replace(_grant("row-1", 1, new_secret("at")), version=3)
    cache = GrantCache()
    heard: list[tuple[int | None, int | None]] = []
    cache.subscribe(
        lambda before, after: heard.append(
            (None if before is None else before.version, None if after is None else after.version)
        )
    )
    assert cache.put(grant)
    assert not cache.put(grant)
    newer = replace(grant, generation=2, version=4)
    assert cache.put(newer)
    cache.drop("techniek", "alice")
    assert heard == [(None, 3), (3, 4), (4, None)]


def test_a_failing_subscriber_does_not_keep_the_others_from_hearing(
    new_secret: Callable[[str], str],
) -> None:
    """One subscriber's error reaches the publisher only after every subscriber has heard, and
    the entry is changed regardless."""
    cache = GrantCache()
    heard: list[str] = []

    def broken(_before: Grant | None, _after: Grant | None) -> None:
        raise RuntimeError("subscriber bug")

    cache.subscribe(broken)
    unsubscribe = cache.subscribe(lambda _b, after: heard.append(after.user if after else "-"))
    with pytest.raises(RuntimeError, match="subscriber bug"):
        cache.put(_grant("row-1", 1, new_secret("at")))
    assert heard == ["alice"]
    assert cache.get("techniek", "alice") is not None
    unsubscribe()
    with pytest.raises(RuntimeError):
        cache.put(replace(_grant("row-1", 2, new_secret("at")), version=1))
    assert heard == ["alice"]
