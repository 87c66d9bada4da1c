"""The Prometheus metrics of CONTRACT.md, on a registry owned by one daemon instance.

No label carries a user, a token, or anything unbounded: provider labels are limited to the
configured providers (anything else is counted as `other`), outcomes to fixed sets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

import broker

PREFIX = "token_broker_"
OTHER_PROVIDER = "other"
TOKEN_OUTCOMES = (
    "served",
    "not_found",
    "forbidden",
    "reauth_required",
    "unavailable",
    "bad_request",
    "unauthenticated",
)
REFRESH_OUTCOMES = ("success", "invalid_grant", "transient_error", "ambiguous")
RECOVERY_OUTCOMES = ("recovered", "lost")
SINK_OUTCOMES = ("written", "removed", "failed")
# The token path answers from memory in tens of microseconds; the buckets must resolve that.
TOKEN_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# From a commit on one broker to its publication on another: milliseconds on a healthy fleet.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REFRESH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class GrantGauges:
    """A point-in-time view for the grant gauges."""

    by_state: Mapping[tuple[str, str], int]  # (provider, state) -> count
    min_ttl: Mapping[str, float]  # provider -> least access-token life of refreshable grants


class HotHistogram(Collector):
    """An unlabelled histogram for the token path, exported exactly as prometheus_client's.

    `observe` is a bisection and two additions with no locks: every metric of a daemon is
    updated from its event loop thread only, and a token request should not pay for the
    thread safety prometheus_client's Histogram takes per bucket (a large share of what the
    steady-state answer costs). Cumulative bucket counts are made when scraped.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = tuple(float(b) for b in buckets if b != float("inf"))
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, amount: float) -> None:
        """Count one observation."""
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def collect(self) -> Iterable[Metric]:
        cumulative, total = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            total += count
            cumulative.append((_bound_text(bound), total))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=cumulative, sum_value=self._sum
        )

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)


class HotCount:
    """One series of a `HotCounter`: an addition, no lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        """Count one."""
        self.value += 1


class HotCounter(Collector):
    """A labelled counter for the token path, exported exactly as prometheus_client's Counter
    (with `*_created` series disabled, as `Metrics` does).

    Like `HotHistogram`, it is updated from the daemon's event loop thread only, so a series
    is a plain integer: prometheus_client's Counter takes a lock for every increment.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], HotCount] = {}
        registry.register(self)

    def labels(self, **labels: str) -> HotCount:
        """The series of these label values (every label named), started at zero if new."""
        if labels.keys() != set(self._labelnames):
            raise ValueError(f"labels must be exactly {self._labelnames}")
        key = tuple(labels[name] for name in self._labelnames)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = HotCount()
        return series

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, series in self._series.items():
            family.add_metric(key, float(series.value))
        yield family

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)


def _bound_text(bound: float) -> str:
    """A bucket's `le` as prometheus_client writes it ("0.005", "1.0", "+Inf")."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


class _GrantCollector(Collector):
    def __init__(self, source: Callable[[], GrantGauges]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        view = self._source()
        grants = GaugeMetricFamily(
            PREFIX + "grants", "Grants by provider and state.", labels=["provider", "state"]
        )
        for (provider, state), count in sorted(view.by_state.items()):
            grants.add_metric([provider, state], count)
        min_ttl = GaugeMetricFamily(
            PREFIX + "access_token_min_ttl_seconds",
            "The least remaining access-token lifetime among active grants with a refresh token.",
            labels=["provider"],
        )
        for provider, ttl in sorted(view.min_ttl.items()):
            min_ttl.add_metric([provider], ttl)
        return [grants, min_ttl]


class Metrics:
    """Every broker metric, registered on a private registry."""

    def __init__(self, providers: Iterable[str]) -> None:
        # `*_created` series double the exposition for no operational use.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.token_requests = HotCounter(
            PREFIX + "token_requests",
            "Token requests by provider and outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.token_request_duration = HotHistogram(
            PREFIX + "token_request_duration_seconds",
            "Time to answer a token request.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.refresh = Counter(
            PREFIX + "refresh",
            "Refreshes at the identity provider by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.refresh_duration = Histogram(
            PREFIX + "refresh_duration_seconds",
            "Time of one refresh at the identity provider.",
            ["provider"],
            buckets=REFRESH_BUCKETS,
            registry=r,
        )
        self.rotation_recoveries = Counter(
            PREFIX + "rotation_recoveries",
            "Refreshes with an unknown outcome, by how they ended.",
            ["provider", "outcome"],
            registry=r,
        )
        self.store_commit_retries = Counter(
            PREFIX + "store_commit_retries",
            "Writes of a refresh's outcome retried because the store failed.",
            registry=r,
        )
        self.provider_paused = Gauge(
            PREFIX + "provider_paused",
            "1 while refreshing is paused because the provider refuses this client "
            "(invalid_client, unauthorized_client).",
            ["provider"],
            registry=r,
        )
        self.lease_takeovers = Counter(
            PREFIX + "lease_takeovers",
            "Grants whose lease this node took over from a node found dead.",
            ["provider"],
            registry=r,
        )
        self.store_up = Gauge(
            PREFIX + "store_up",
            "1 while this broker's heartbeat reaches the store; 0 when it has not for a beat.",
            registry=r,
        )
        self.fleet_change_lag = Histogram(
            PREFIX + "fleet_change_lag_seconds",
            "From a write committed by another broker (or process) sharing the store to its "
            "publication on this one.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.build_info = Gauge(
            PREFIX + "build_info", "The running version.", ["version"], registry=r
        )
        self.build_info.labels(version=broker.__version__).set(1)
        self.sink_writes = Counter(
            PREFIX + "sink_writes",
            "Sink file writes and removals, and attempts that failed.",
            ["outcome"],
            registry=r,
        )
        for outcome in SINK_OUTCOMES:
            self.sink_writes.labels(outcome=outcome)
        self._providers: frozenset[str] = frozenset()
        self.add_providers(providers)

    def add_providers(self, providers: Iterable[str]) -> None:
        """Start series at zero for these providers (a reload may add some; none is dropped)."""
        for provider in sorted(set(providers) - self._providers):
            for outcome in TOKEN_OUTCOMES:
                self.token_requests.labels(provider=provider, outcome=outcome)
            for outcome in REFRESH_OUTCOMES:
                self.refresh.labels(provider=provider, outcome=outcome)
            for outcome in RECOVERY_OUTCOMES:
                self.rotation_recoveries.labels(provider=provider, outcome=outcome)
            self.refresh_duration.labels(provider=provider)
            self.provider_paused.labels(provider=provider).set(0)
            self.lease_takeovers.labels(provider=provider)
        self._providers = self._providers | frozenset(providers)

    def provider_label(self, provider: str) -> str:
        """`provider` when it is configured, else `other`: request paths must not mint labels."""
        return provider if provider in self._providers else OTHER_PROVIDER

    def count_token_request(self, provider: str, outcome: str, seconds: float | None) -> None:
        """Count one answered token request; `seconds` None leaves a held one out of the timing."""
        self.token_requests.labels(provider=self.provider_label(provider), outcome=outcome).inc()
        if seconds is not None:
            self.token_request_duration.observe(seconds)

    def watch_grants(self, source: Callable[[], GrantGauges]) -> None:
        """Export the grant gauges, read from `source` at every scrape."""
        self.registry.register(_GrantCollector(source))
