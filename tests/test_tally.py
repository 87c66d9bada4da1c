"""The grant tally: counts and least token life kept from cache changes, equal to a recount."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cache import GrantCache
from broker.metrics import GrantGauges
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.tally import GrantTally

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def recount(cache: GrantCache, now: datetime) -> GrantGauges:
    """The gauges by looking at every cached grant: what the tally must equal."""
    by_state: Counter[tuple[str, str]] = Counter()
    min_ttl: dict[str, float] = {}
    for grant in cache:
        state = grant.effective_state(now)
        by_state[(grant.provider, state.value)] += 1
        if state is GrantState.ACTIVE and grant.tokens.refresh_token is not None:
            ttl = grant.access_ttl(now)
            min_ttl[grant.provider] = min(ttl, min_ttl.get(grant.provider, ttl))
    return GrantGauges(by_state=dict(by_state), min_ttl=min_ttl)


def tallied(cache: GrantCache) -> GrantTally:
    tally = GrantTally(cache.by_id)
    cache.subscribe(tally.update)
    return tally


def make(
    user: str,
    *,
    provider: str = "p",
    state: GrantState = GrantState.ACTIVE,
    refresh: bool = True,
    access: bool = True,
    expires_in: float | None = 300.0,
    version: int = 1,
) -> Grant:
    return Grant(
        id=f"id-{provider}-{user}",
        provider=provider,
        user=user,
        state=state,
        generation=1,
        tokens=TokenSet(
            refresh_token=Secret("r") if refresh else None,
            access_token=Secret("a") if access else None,
        ),
        access_expires_at=None if expires_in is None else T0 + timedelta(seconds=expires_in),
        version=version,
    )


def test_counts_and_least_life_follow_puts_and_drops() -> None:
    """A rotation moves the least life; a state change and a deletion move one count each."""
    cache = GrantCache()
    tally = tallied(cache)
    cache.put(make("a", expires_in=60))
    cache.put(make("b", expires_in=120))
    cache.put(make("c", state=GrantState.REAUTH_REQUIRED))
    gauges = tally.gauges(T0)
    assert gauges.by_state == {("p", "active"): 2, ("p", "reauth_required"): 1}
    assert gauges.min_ttl == {"p": 60.0}
    cache.put(make("a", expires_in=600, version=2))  # rotated
    assert tally.gauges(T0).min_ttl == {"p": 120.0}
    cache.drop("p", "b")
    cache.put(make("c", version=2))  # logged in again
    gauges = tally.gauges(T0 + timedelta(seconds=100))
    assert gauges.by_state == {("p", "active"): 2}
    assert gauges.min_ttl == {"p": 200.0}


def test_a_grant_without_refresh_token_needs_a_login_once_its_token_expires() -> None:
    """Its state as callers see it changes with time alone; the tally judges it at each reading.
    Its token runs out by design, so it is not in the least life (which is about refreshes)."""
    cache = GrantCache()
    tally = tallied(cache)
    cache.put(make("a", refresh=False, expires_in=30))
    cache.put(make("b", expires_in=90))
    assert tally.gauges(T0).by_state == {("p", "active"): 2}
    assert tally.gauges(T0).min_ttl == {"p": 90.0}
    cache.drop("p", "b")
    assert tally.gauges(T0).min_ttl == {}
    later = tally.gauges(T0 + timedelta(seconds=31))
    assert later.by_state == {("p", "reauth_required"): 1}
    assert later.min_ttl == {}


def test_the_heap_of_expiries_stays_bounded_by_the_live_grants() -> None:
    """Superseded entries are compacted away even when nobody reads the gauges."""
    cache = GrantCache()
    tally = tallied(cache)
    for version in range(1, 2_000):
        cache.put(make("a", expires_in=float(version), version=version))
    assert len(tally._expiries["p"]) <= 2 + 64


changes = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["p", "q"]),
        st.sampled_from([None, *GrantState]),  # None: drop
        st.booleans(),
        st.booleans(),
        st.one_of(st.none(), st.floats(-100, 1000)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(changes, st.floats(-50, 1200))
def test_the_tally_equals_a_recount_after_any_changes(
    steps: list[tuple[str, str, GrantState | None, bool, bool, float | None]], offset: float
) -> None:
    """Whatever the cache went through, a reading equals counting every grant at that time."""
    cache = GrantCache()
    tally = tallied(cache)
    for version, (user, provider, state, refresh, access, expires_in) in enumerate(steps, 1):
        if state is None:
            cache.drop(provider, user)
            continue
        cache.put(
            make(
                user,
                provider=provider,
                state=state,
                refresh=refresh,
                access=access,
                expires_in=expires_in,
                version=version,
            )
        )
        now = T0 + timedelta(seconds=offset)
        assert tally.gauges(now) == recount(cache, now)
