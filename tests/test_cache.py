"""Tests for broker.cache: the newest generation of a row wins; a new row replaces an old one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

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
