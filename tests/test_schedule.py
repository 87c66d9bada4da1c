"""The pure schedule: when to refresh, how long to back off, what each refresh outcome leads to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.schedule import (
    BACKOFF_CAP,
    RETRY_AFTER_CAP,
    Decision,
    Failure,
    Outcome,
    RefreshPolicy,
    backoff,
    decide,
    due_at,
    failure_class,
    needs_refresh,
    replay_delay,
)

T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
NO_JITTER = RefreshPolicy(lifetime_fraction=0.75, min_margin=timedelta(seconds=60), jitter=0.0)
ONE_MICROSECOND = timedelta(microseconds=1)


def seconds(value: float) -> timedelta:
    """A timedelta of `value` seconds."""
    return timedelta(seconds=value)


# Policies as the config validator admits them: 0 < fraction < 1, 0 <= jitter < 0.5.
policies = st.builds(
    RefreshPolicy,
    lifetime_fraction=st.floats(0.01, 0.99),
    min_margin=st.integers(0, 7200).map(seconds),
    jitter=st.floats(0.0, 0.49),
)
# Hypothesis takes naive bounds and attaches the zone itself.
moments = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2100, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
lifetimes = st.integers(-3600, 10 * 365 * 86_400).map(seconds)
rands = st.floats(0.0, 1.0, exclude_max=True)


def spec_target(issued: datetime, expires: datetime, policy: RefreshPolicy) -> datetime:
    """Where due_at lands without jitter, written from the docstring, not from the code."""
    life = expires - issued
    at_fraction = issued + life * policy.lifetime_fraction
    latest = expires - policy.min_margin
    if latest <= issued:
        return issued + life * min(policy.lifetime_fraction, 0.5)
    return min(at_fraction, latest)


# -- due_at -----------------------------------------------------------------------------------


def test_due_at_is_at_the_lifetime_fraction() -> None:
    """A long-lived token is refreshed at lifetime_fraction of its life."""
    assert due_at(T0, T0 + seconds(1000), NO_JITTER, 0.0) == T0 + seconds(750)


def test_due_at_is_no_later_than_min_margin_before_expiry() -> None:
    """When the fraction falls inside the margin, the refresh moves to min_margin before expiry."""
    assert due_at(T0, T0 + seconds(200), NO_JITTER, 0.0) == T0 + seconds(140)


@pytest.mark.parametrize(
    ("fraction", "expected"), [(0.75, 25), (0.5, 25), (0.3, 15), (0.9, 25)], ids=str
)
def test_a_token_too_short_for_the_margin_is_refreshed_at_min_of_fraction_and_half(
    fraction: float, expected: int
) -> None:
    """A 50 s token under a 60 s margin comes due at min(fraction, 0.5) of its life."""
    policy = RefreshPolicy(lifetime_fraction=fraction, min_margin=seconds(60), jitter=0.0)
    assert due_at(T0, T0 + seconds(50), policy, 0.0) == T0 + seconds(expected)


def test_a_token_exactly_as_long_as_the_margin_counts_as_too_short() -> None:
    """When expiry minus the margin is the issue time itself, the half-life rule applies."""
    assert due_at(T0, T0 + seconds(60), NO_JITTER, 0.0) == T0 + seconds(30)


@pytest.mark.parametrize("life", [0, -1, -3600])
def test_a_token_with_no_life_left_is_due_at_its_issue_time(life: int) -> None:
    """A token that expires at or before its issue time is due at once."""
    assert due_at(T0, T0 + seconds(life), NO_JITTER, 0.99) == T0


def test_jitter_moves_due_at_earlier_by_its_share_of_the_wait() -> None:
    """jitter * rand of the wait is taken off: 10 % jitter at rand 0.5 is 5 % of 750 s."""
    policy = RefreshPolicy(lifetime_fraction=0.75, min_margin=seconds(60), jitter=0.1)
    assert due_at(T0, T0 + seconds(1000), policy, 0.5) == T0 + seconds(712.5)
    assert due_at(T0, T0 + seconds(1000), policy, 0.0) == T0 + seconds(750)


@given(issued=moments, life=lifetimes, policy=policies, rand=rands)
def test_due_at_properties(
    issued: datetime, life: timedelta, policy: RefreshPolicy, rand: float
) -> None:
    """due_at is never before issue nor past the margin; jitter only ever pulls it earlier."""
    expires = issued + life
    due = due_at(issued, expires, policy, rand)
    assert due >= issued
    if life <= timedelta(0):
        assert due == issued
        return
    target = spec_target(issued, expires, policy)
    assert due <= target
    latest = expires - policy.min_margin
    if latest > issued:
        assert due <= latest
    # Jitter is bounded by jitter * wait (one microsecond of rounding either way).
    assert due >= target - (target - issued) * policy.jitter - ONE_MICROSECOND
    assert due_at(issued, expires, policy, 0.0) == target


@given(issued=moments, life=st.integers(1, 10**8).map(seconds), policy=policies, a=rands, b=rands)
def test_due_at_is_earlier_for_a_larger_rand(
    issued: datetime, life: timedelta, policy: RefreshPolicy, a: float, b: float
) -> None:
    """A larger random draw never schedules later (jitter has one direction)."""
    low, high = sorted((a, b))
    expires = issued + life
    assert due_at(issued, expires, policy, high) <= due_at(issued, expires, policy, low)


# -- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "step"),
    [(1, 5), (2, 10), (3, 20), (4, 40), (7, 320), (8, 600), (9, 600), (10**6, 600)],
)
def test_backoff_is_exponential_with_equal_jitter_and_capped(failures: int, step: int) -> None:
    """The n-th failure waits between half and all of min(5 s * 2^(n-1), 10 min)."""
    policy = RefreshPolicy()
    assert backoff(failures, policy, 0.0) == seconds(step / 2)
    assert backoff(failures, policy, 0.5) == seconds(step * 0.75)
    assert backoff(failures, policy, 0.999999) < seconds(step)


def test_backoff_of_zero_failures_is_that_of_the_first() -> None:
    """A failure count of 0 (or less) is treated as the first failure, never as no wait."""
    policy = RefreshPolicy()
    assert backoff(0, policy, 0.0) == backoff(1, policy, 0.0) == seconds(2.5)
    assert backoff(-5, policy, 0.0) == seconds(2.5)


def test_backoff_follows_the_policy_base_and_cap() -> None:
    """A policy's own base and cap replace the defaults."""
    policy = RefreshPolicy(backoff_base=seconds(1), backoff_cap=seconds(8))
    assert [backoff(n, policy, 0.0) for n in range(1, 6)] == [seconds(s) for s in (0.5, 1, 2, 4, 4)]


def test_retry_after_longer_than_the_backoff_is_honoured() -> None:
    """An IdP's Retry-After longer than the back-off is waited out in full."""
    assert backoff(1, RefreshPolicy(), 0.0, retry_after=120) == seconds(120)


def test_retry_after_shorter_than_the_backoff_does_not_shorten_it() -> None:
    """Retry-After is a floor, never a way to retry sooner than the back-off."""
    assert backoff(5, RefreshPolicy(), 0.0, retry_after=1) == seconds(40)


def test_retry_after_is_capped_at_an_hour() -> None:
    """A Retry-After of two hours waits one hour."""
    assert timedelta(hours=1) == RETRY_AFTER_CAP
    assert backoff(1, RefreshPolicy(), 0.0, retry_after=7200) == timedelta(hours=1)


@pytest.mark.parametrize("retry_after", [0, -30, None])
def test_a_zero_or_negative_retry_after_is_ignored(retry_after: float | None) -> None:
    """Retry-After of zero, negative or absent leaves the plain back-off."""
    assert backoff(3, RefreshPolicy(), 0.0, retry_after=retry_after) == seconds(10)


@given(
    failures=st.integers(-3, 10**9),
    rand=rands,
    retry_after=st.none() | st.floats(-100, 10**6, allow_nan=False),
)
def test_backoff_properties(failures: int, rand: float, retry_after: float | None) -> None:
    """Equal jitter within [step/2, step); Retry-After (at most an hour) is a floor."""
    policy = RefreshPolicy()
    exponent = min(max(failures, 1) - 1, 30)
    step = min(policy.backoff_base * 2**exponent, BACKOFF_CAP)
    plain = backoff(failures, policy, rand)
    assert step / 2 <= plain <= step
    delay = backoff(failures, policy, rand, retry_after)
    if retry_after is None or retry_after <= 0:
        assert delay == plain
    else:
        assert delay == max(plain, min(seconds(retry_after), RETRY_AFTER_CAP))
        assert delay <= max(BACKOFF_CAP, RETRY_AFTER_CAP)


# -- decide -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "decision"),
    [
        (Outcome.SUCCESS, Decision.COMMIT),
        (Outcome.TERMINAL, Decision.REAUTH),
        (Outcome.CLIENT_ERROR, Decision.PAUSE),
        (Outcome.TRANSIENT, Decision.BACKOFF),
    ],
)
@pytest.mark.parametrize("grace", [0, 30])
@pytest.mark.parametrize("elapsed", [0, 29, 30, 3600])
def test_known_outcomes_decide_regardless_of_time_and_grace(
    outcome: Outcome, decision: Decision, grace: int, elapsed: int
) -> None:
    """Success commits, terminal needs a login, a client error pauses the provider, transient
    backs off: grace and introspection play no part."""
    for can_introspect in (False, True):
        got = decide(
            outcome,
            now=T0 + seconds(elapsed),
            first_sent_at=T0,
            grace=seconds(grace),
            can_introspect=can_introspect,
        )
        assert got is decision


@pytest.mark.parametrize(
    ("elapsed", "decision"),
    [
        (-5, Decision.REPLAY),  # the clock stepped back: still inside
        (0, Decision.REPLAY),
        (29.999999, Decision.REPLAY),
        (30, Decision.LOST),  # the grace window is open on the right
        (30.000001, Decision.LOST),
        (86_400, Decision.LOST),
    ],
)
def test_ambiguous_replays_strictly_inside_grace_from_the_first_send(
    elapsed: float, decision: Decision
) -> None:
    """An unknown outcome is replayed only while now < first send + grace."""
    got = decide(Outcome.AMBIGUOUS, now=T0 + seconds(elapsed), first_sent_at=T0, grace=seconds(30))
    assert got is decision


@pytest.mark.parametrize("grace", [0, -1])
@pytest.mark.parametrize("elapsed", [-1, 0, 1])
def test_ambiguous_without_grace_is_always_lost(grace: int, elapsed: int) -> None:
    """With no grace there is no safe replay, not even at the instant of sending."""
    got = decide(
        Outcome.AMBIGUOUS, now=T0 + seconds(elapsed), first_sent_at=T0, grace=seconds(grace)
    )
    assert got is Decision.LOST


@given(
    first=moments,
    offset=st.integers(-(10**8), 10**8).map(lambda us: timedelta(microseconds=us)),
    grace=st.integers(0, 10**8).map(lambda us: timedelta(microseconds=us)),
)
def test_ambiguous_decision_property(first: datetime, offset: timedelta, grace: timedelta) -> None:
    """REPLAY exactly when grace > 0 and now < first_sent + grace; LOST otherwise."""
    got = decide(Outcome.AMBIGUOUS, now=first + offset, first_sent_at=first, grace=grace)
    expected = grace > timedelta(0) and offset < grace
    assert got is (Decision.REPLAY if expected else Decision.LOST)


@pytest.mark.parametrize(("grace", "elapsed"), [(0, 0), (30, 30), (30, 3600)])
def test_ambiguous_outside_grace_introspects_where_the_provider_allows(
    grace: int, elapsed: int
) -> None:
    """Outside grace, a provider that lets this client introspect is asked before giving up."""
    got = decide(
        Outcome.AMBIGUOUS,
        now=T0 + seconds(elapsed),
        first_sent_at=T0,
        grace=seconds(grace),
        can_introspect=True,
    )
    assert got is Decision.INTROSPECT


def test_ambiguous_inside_grace_replays_rather_than_introspects() -> None:
    """Inside grace the replay recovers the pair itself: no need to ask."""
    got = decide(
        Outcome.AMBIGUOUS,
        now=T0 + seconds(1),
        first_sent_at=T0,
        grace=seconds(30),
        can_introspect=True,
    )
    assert got is Decision.REPLAY


def test_client_errors_count_as_transient_errors_in_the_metric() -> None:
    """A client error is nothing final about the grant: refresh_total counts it as transient."""
    assert Outcome.CLIENT_ERROR.metric_label == "transient_error"
    assert [o.metric_label for o in Outcome if o is not Outcome.CLIENT_ERROR] == [
        "success",
        "invalid_grant",
        "transient_error",
        "ambiguous",
    ]


# -- failure_class -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "status", "failure"),
    [
        (False, None, Failure.NEVER_SENT),  # refused, DNS, TLS, discovery before the intent
        (False, 503, Failure.NEVER_SENT),  # whatever answered, it was not the token request
        (True, None, Failure.AMBIGUOUS),  # read timeout, reset after send, a killed process
        (True, 429, Failure.NOT_PROCESSED),
        (True, 503, Failure.NOT_PROCESSED),
        (True, 400, Failure.NOT_PROCESSED),
        (True, 401, Failure.NOT_PROCESSED),
        (True, 403, Failure.NOT_PROCESSED),
        (True, 404, Failure.NOT_PROCESSED),
        (True, 302, Failure.NOT_PROCESSED),
        (True, 500, Failure.AMBIGUOUS),
        (True, 502, Failure.AMBIGUOUS),
        (True, 504, Failure.AMBIGUOUS),
        (True, 599, Failure.AMBIGUOUS),
        (True, 200, Failure.AMBIGUOUS),  # a success whose body cannot be used
    ],
)
def test_failure_class_follows_rotation_invariant_4(
    sent: bool, status: int | None, failure: Failure
) -> None:
    """Never sent, not processed (429, 503, 4xx) and ambiguous (no answer, 500, 502, 504, an
    unusable 200) are told apart by whether the request left and how it was answered."""
    assert failure_class(sent=sent, status=status) is failure


# -- replay_delay ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "delay"), [(0, 0.5), (1, 0.5), (2, 1), (3, 2), (4, 4), (5, 5), (6, 5), (10**6, 5)]
)
def test_replay_delay_doubles_from_half_a_second_to_five(attempt: int, delay: float) -> None:
    """Replays wait 0.5 s, 1 s, 2 s, 4 s, then 5 s each."""
    assert replay_delay(attempt) == seconds(delay)


@given(a=st.integers(-10, 10**9), b=st.integers(-10, 10**9))
def test_replay_delay_is_bounded_and_never_shrinks(a: int, b: int) -> None:
    """Every replay delay lies in [0.5 s, 5 s], and a later attempt never waits less."""
    low, high = sorted((a, b))
    assert seconds(0.5) <= replay_delay(low) <= replay_delay(high) <= seconds(5)


# -- needs_refresh -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "min_ttl", "expected"),
    [
        (None, 0, True),  # no access token expiry known
        (-1, 0, True),  # expired
        (0, 0, True),  # expiring this instant
        (0.000001, 0, False),
        (10, 10, False),  # exactly min_ttl left is enough
        (10, 10.5, True),
        (3600, 60, False),
    ],
)
def test_needs_refresh(remaining: float | None, min_ttl: float, expected: bool) -> None:
    """Refresh when there is no expiry, it has passed, or less than min_ttl is left."""
    expires = None if remaining is None else T0 + seconds(remaining)
    assert needs_refresh(expires, T0, min_ttl) is expected


@given(
    now=moments,
    remaining_us=st.none() | st.integers(-(10**10), 10**10),
    min_ttl=st.integers(0, 10**5),
)
def test_needs_refresh_property(now: datetime, remaining_us: int | None, min_ttl: int) -> None:
    """needs_refresh is exactly: no expiry, or remaining <= 0, or remaining < min_ttl."""
    if remaining_us is None:
        assert needs_refresh(None, now, min_ttl)
        return
    remaining = timedelta(microseconds=remaining_us)
    expected = remaining <= timedelta(0) or remaining < seconds(min_ttl)
    assert needs_refresh(now + remaining, now, min_ttl) is expected
