"""The agenda: when each cached grant comes due, kept from the cache's publishes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from broker.agenda import RECHECK, Agenda, due_at
from broker.cache import GrantCache
from broker.model import Grant, GrantState, Secret, TokenSet

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def grant(user: str, due: datetime | None, version: int = 1) -> Grant:
    """An active grant with a refresh token, due at `due`."""
    return Grant(
        id=f"id-{user}",
        provider="p",
        user=user,
        state=GrantState.ACTIVE,
        generation=1,
        tokens=TokenSet(refresh_token=Secret(f"rt-{user}"), access_token=Secret(f"at-{user}")),
        next_refresh_at=due,
        version=version,
    )


def test_grants_come_due_at_their_refresh_time_earliest_first() -> None:
    """take_due hands out what is due, in due order, and nothing later."""
    cache, agenda = GrantCache(), Agenda()
    cache.subscribe(agenda.update)
    for user, minutes in (("b", 2), ("a", 1), ("c", 5)):
        cache.put(grant(user, T0 + timedelta(minutes=minutes)))
    assert agenda.next_at() == T0 + timedelta(minutes=1)
    assert agenda.take_due(T0 + timedelta(minutes=3), 10) == [("id-a", 1), ("id-b", 1)]
    assert agenda.next_at() == T0 + timedelta(minutes=5)
    assert agenda.take_due(T0 + timedelta(minutes=3), 10) == []


def test_a_newer_version_moves_the_entry_and_the_old_one_never_fires() -> None:
    """A publish supersedes the grant's entry (a refresh moved its due time)."""
    cache, agenda = GrantCache(), Agenda()
    cache.subscribe(agenda.update)
    cache.put(grant("a", T0))
    cache.put(grant("a", T0 + timedelta(hours=1), version=2))
    assert agenda.take_due(T0 + timedelta(minutes=1), 10) == []
    assert agenda.take_due(T0 + timedelta(hours=1), 10) == [("id-a", 2)]


def test_a_grant_that_cannot_be_refreshed_is_never_due() -> None:
    """No refresh token, a grant needing a login, a deleted grant: off the agenda."""
    cache, agenda = GrantCache(), Agenda()
    cache.subscribe(agenda.update)
    cache.put(replace(grant("a", T0), tokens=TokenSet(access_token=Secret("at"))))
    cache.put(replace(grant("b", T0), state=GrantState.REAUTH_REQUIRED))
    cache.put(grant("c", T0))
    cache.drop("p", "c")
    assert agenda.next_at() is None
    assert len(agenda) == 0


def test_a_claimed_grant_is_looked_at_again_only_after_a_recheck() -> None:
    """An open intent (someone's claim) is not due at once: its owner is given RECHECK."""
    claimed = replace(grant("a", T0), intent_at=T0, updated_at=T0)
    assert due_at(claimed) == T0 + RECHECK


def test_a_grant_put_back_comes_due_again() -> None:
    """A grant taken but not claimed (held elsewhere) is put back for later."""
    agenda = Agenda()
    agenda.put("id-a", T0, 3)
    assert agenda.take_due(T0, 10) == [("id-a", 3)]
    agenda.put("id-a", T0 + RECHECK, 3)
    assert agenda.take_due(T0, 10) == []
    assert agenda.take_due(T0 + RECHECK, 10) == [("id-a", 3)]


def test_take_due_stops_at_its_limit() -> None:
    """A backlog is handed out a batch at a time."""
    agenda = Agenda()
    for i in range(10):
        agenda.put(f"id-{i}", T0 + timedelta(seconds=i), 1)
    assert len(agenda.take_due(T0 + timedelta(hours=1), 4)) == 4
    assert len(agenda) == 6
