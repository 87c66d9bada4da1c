"""The token path's lock-free histogram is exported exactly as prometheus_client's own."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from broker.metrics import TOKEN_BUCKETS, HotHistogram

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
