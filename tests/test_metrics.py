"""The token path's lock-free histogram and counter export exactly as prometheus_client's."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from broker.metrics import TOKEN_BUCKETS, HotCounter, HotHistogram

NAME = "token_broker_token_request_duration_seconds"
HELP = "Time to answer a token request."


def exposition(values: list[float], *, hot: bool) -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    metric: HotHistogram | Histogram
    if hot:
        metric = HotHistogram(NAME, HELP, buckets=TOKEN_BUCKETS, registry=registry)
    else:
        metric = Histogram(NAME, HELP, buckets=TOKEN_BUCKETS, registry=registry)
    for value in values:
        metric.observe(value)
    return b"\n".join(
        line for line in generate_latest(registry).splitlines() if b"_created" not in line
    )


seconds = st.one_of(
    st.sampled_from([0.0, *TOKEN_BUCKETS]),  # exactly on a bound: that bucket counts it
    st.floats(min_value=0.0, max_value=30.0, allow_nan=False),
)


@settings(max_examples=200)
@given(st.lists(seconds, max_size=50))
def test_the_same_observations_give_the_same_exposition(values: list[float]) -> None:
    """Bucket bounds, cumulative counts, sum and count: byte for byte prometheus_client's."""
    assert exposition(values, hot=True) == exposition(values, hot=False)


COUNTER = "token_broker_token_requests"
COUNTER_HELP = "Token requests by provider and outcome."
label_values = st.sampled_from(["alpha", "beta", "other", 'q"uo\\te'])


def counter_exposition(increments: list[tuple[str, str]], *, hot: bool) -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    labelnames = ["provider", "outcome"]
    metric: HotCounter | Counter
    if hot:
        metric = HotCounter(COUNTER, COUNTER_HELP, labelnames, registry=registry)
    else:
        metric = Counter(COUNTER, COUNTER_HELP, labelnames, registry=registry)
    metric.labels(provider="alpha", outcome="served")  # a series started at zero
    for provider, outcome in increments:
        metric.labels(provider=provider, outcome=outcome).inc()
    return b"\n".join(
        line for line in generate_latest(registry).splitlines() if b"_created" not in line
    )


@settings(max_examples=100)
@given(st.lists(st.tuples(label_values, st.sampled_from(["served", "not_found"])), max_size=40))
def test_the_same_increments_give_the_same_counter_exposition(
    increments: list[tuple[str, str]],
) -> None:
    """Series order, label escaping, values: byte for byte prometheus_client's Counter."""
    assert counter_exposition(increments, hot=True) == counter_exposition(increments, hot=False)


def test_a_hot_counter_wants_every_label_and_no_other() -> None:
    metric = HotCounter(
        COUNTER, COUNTER_HELP, ["provider", "outcome"], registry=CollectorRegistry()
    )
    with pytest.raises(ValueError, match="provider"):
        metric.labels(provider="alpha")
    with pytest.raises(ValueError, match="outcome"):
        metric.labels(provider="alpha", outcome="served", user="alice")
