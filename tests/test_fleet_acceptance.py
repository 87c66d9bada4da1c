"""Three brokers on one PostgreSQL, against the real django-oauth-toolkit IdP, for minutes.

The fleet of the Fleet section of CONTRACT.md: three `token-broker serve` processes on one
PostgreSQL database (a cluster of the test's own, which it stops and restarts), one of them
under a wall clock 3 s ahead of the others (libfaketime, tests/fakeclock.py), 30 grants (or
TOKEN_BROKER_FLEET_GRANTS) with 6-second access tokens (or TOKEN_BROKER_FLEET_LIFETIME) at the
IdP (reuse protection on), and
client loops fetching tokens from all three for 120 s (or TOKEN_BROKER_FLEET_SECONDS), a share
of them with a `min_ttl` that forces an off-schedule refresh. What is checked comes from
outside the brokers:

- the IdP's reuse detections (its reuse protection revokes a family on any replay outside
  grace): none;
- every distinct token served is sent to the IdP's userinfo endpoint the moment a client gets
  it; a rejection is allowed only when a refresh of that grant (by any broker, from its log,
  its clock's offset taken out) started after the client sent its request: the provider
  deleted the token after it was served;
- no HTTP 500 anywhere;
- how the refreshes split over the three brokers (none below 20%);
- `fleet_change_lag_seconds` from every broker's /metrics (p50, p99);
- with one broker SIGKILLed every 10 s and restarted: the grants lost (rotation_lost), against
  the refreshes that broker had at the provider when it died (its open intents);
- with the database stopped for 20 s, and later restarted: as it stops, every broker serves
  every sampled grant whose token still has 1.5 s to live, and the tokens work at the IdP;
  /readyz says 503 with the reason while it is down, and all recover without a restart.

`make fleet` runs these and prints their numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from broker.store.engine import create_engine
from broker.tasks import Tasks
from tests.daemon import request
from tests.fakeclock import FakeClock, find_libfaketime
from tests.idp import fixture as idp_fixture
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory
from tests.postgres import PostgresServer, PrivatePostgres, find_pg_bin, start_postgres
from tests.rotation_harness import (
    REGISTERED_REDIRECT,
    BrokerProcess,
    Installation,
    RefreshCall,
    RefreshSettings,
    Reply,
    UserInfo,
    installation,
    log_events,
    refresh_calls,
    report,
    stats_delta,
    users,
)

django_idp_factory = idp_fixture.django_idp_factory

pytestmark = [pytest.mark.slow, pytest.mark.fleet]

# 30 grants of 6-second tokens: about 8 refreshes a second at the IdP, which this 2-core machine
# sustains while it also runs PostgreSQL, three brokers and the clients. The fleet issue's
# acceptance asks for 200 grants of 5-second tokens (TOKEN_BROKER_FLEET_GRANTS=200
# TOKEN_BROKER_FLEET_LIFETIME=5): 67 refreshes a second, more than django-oauth-toolkit answers
# here, so tokens are served near their expiry and the figures measure the IdP's saturation.
GRANTS = int(os.environ.get("TOKEN_BROKER_FLEET_GRANTS", "30"))
SECONDS = float(os.environ.get("TOKEN_BROKER_FLEET_SECONDS", "120"))
LIFETIME = int(os.environ.get("TOKEN_BROKER_FLEET_LIFETIME", "6"))
SKEW = 3.0  # seconds node "c"'s wall clock runs ahead
SETTINGS = RefreshSettings(lifetime_fraction=0.6, min_margin="1s", jitter=0.1, max_concurrency=16)
LOOPS_PER_NODE = 3
CLIENT_PAUSE = 0.05  # each loop: about 15 requests a second, 135 in all
MIN_TTL_SHARE = 0.05  # of requests ask for more life than is left: off-schedule refreshes
MIN_TTL = 4
KILL_EVERY = 10.0
OUTAGE = 20.0
MIN_MARGIN = 1.0  # SETTINGS.min_margin in seconds
EXPIRY_TOLERANCE = 0.5  # seconds between the brokers' idea of an expiry and the IdP's
PROBE_USERS = 60  # grants each node is asked for as the database stops
PROBE_LEFT = 1.5  # seconds of life a token needs then to have to be probed
# What a refusal during the outage may say: the grant's refresh token was at the provider when
# the store went, so its old access token is gone, and the new one cannot be stored yet.
ROTATION_IN_FLIGHT = ("its new tokens are being stored", "is taking long")
NODES = ("a", "b", "c")


@dataclass
class Traffic:
    """What the client loops saw."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_node: Counter[str] = field(default_factory=Counter)
    served: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (user, sent)
    rejected: list[tuple[str, str, float, float, float]] = field(default_factory=list)
    # (user, token, request sent, check done, the token's expiry as served)
    near_expiry: int = 0  # tokens served with less than min_margin to live
    served_by: dict[str, str] = field(default_factory=dict)  # token -> node
    # (user, token, request sent, check done)


class FleetRun:
    """Three brokers on one database, their clients, and the faults a run injects."""

    def __init__(
        self, idp: DjangoIdP, inst: Installation, pg: PrivatePostgres, clock: FakeClock
    ) -> None:
        self.idp, self.inst, self.pg, self.clock = idp, inst, pg, clock
        self.userinfo = UserInfo(idp)
        self.accounts = list(users(GRANTS))
        self.nodes: dict[str, BrokerProcess] = {}
        self.kills: list[tuple[str, int]] = []  # (node id killed, its refreshes in flight)
        self.readyz_down: list[tuple[str, int, str]] = []
        self.outage_serves: Counter[str] = Counter()
        self.outage_probed: Counter[str] = Counter()
        self.outage_refused: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
        self.stop_seconds = 0.0

    def env(self, name: str) -> dict[str, str]:
        """The environment a node runs with: node "c" under a clock SKEW seconds ahead."""
        return self.clock.env() if name == "c" else {}

    async def start(self, grace: int) -> None:
        """Start the three brokers and log every account in through the first."""
        first = None
        for name in NODES:
            broker = self.inst.broker(
                name,
                refresh=SETTINGS,
                refresh_grace=f"{grace}s",
                callback=first is None,
                redirect_port=None if first is None else first.callback_port,
            )
            first = first or broker
            self.nodes[name] = broker
            await asyncio.to_thread(broker.start, self.env(name))
        assert first is not None
        await first.log_in_all(dict(users(GRANTS)), concurrency=8)

    async def clients(self, seconds: float, traffic: Traffic, stop: asyncio.Event) -> None:
        """Client loops on every node until `seconds` pass or `stop` is set."""
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(
                self._loop(name, traffic, deadline, stop, random.Random(i * 7919 + ord(name)))
                for i in range(LOOPS_PER_NODE)
                for name in NODES
            )
        )

    async def _loop(
        self,
        name: str,
        traffic: Traffic,
        deadline: float,
        stop: asyncio.Event,
        rng: random.Random,
    ) -> None:
        while time.monotonic() < deadline and not stop.is_set():
            broker = self.nodes[name]
            user = rng.choice(self.accounts)
            min_ttl = MIN_TTL if rng.random() < MIN_TTL_SHARE else None
            sent = time.time()
            try:
                reply = await broker.token(user, min_ttl)
            except Exception:  # noqa: BLE001 - a node being killed and restarted refuses
                await asyncio.sleep(0.05)
                continue
            traffic.requests += 1
            traffic.statuses[reply.status] += 1
            if reply.status == 200:
                traffic.by_node[name] += 1
                await self._check(name, user, reply.json(), sent, traffic)
            await asyncio.sleep(CLIENT_PAUSE)

    # -- faults -------------------------------------------------------------------------------

    async def kill_every(self, name: str, every: float, until: float) -> None:
        """SIGKILL node `name` every `every` seconds (and start it again) until `until`."""
        while time.monotonic() + every < until:
            await asyncio.sleep(every)
            broker = self.nodes[name]
            node_id = self.node_id(broker)
            broker.kill()
            in_flight = await self._intents_of(node_id)
            self.kills.append((node_id, in_flight))
            await asyncio.to_thread(broker.start, self.env(name))

    @staticmethod
    def node_id(broker: BrokerProcess) -> str:
        """The current incarnation's node id, from its log."""
        joined = log_events(broker.process.log(), "node_joined")
        assert joined, f"{broker.name} has not joined the fleet"
        return str(joined[-1]["node"])

    async def _intents_of(self, node_id: str) -> int:
        """Refreshes a killed node left with their outcome unknown (its claims in the store)."""
        engine = create_engine(self.inst.store_url)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    text(
                        "SELECT count(*) FROM grants WHERE lease_owner = :node "
                        "AND intent_at IS NOT NULL"
                    ),
                    {"node": node_id},
                )
                return int(result.scalar_one())
        finally:
            await engine.dispose()

    async def outage(self, seconds: float, traffic: Traffic) -> None:
        """Stop the database for `seconds`; probe serving as it stops, and /readyz meanwhile.

        Right before the stop every node is asked for a sample of grants; right after it, every
        node at once, the ones whose token still has PROBE_LEFT seconds to live are asked
        again. Each must be served (from memory: the store is gone) and the token must work at
        the IdP, unless a refresh begun after the request explains its rejection (as for all
        traffic); a refusal must name a rotation that was in flight when the store went (the
        provider has deleted the old token: ROTATION.md invariant 7).
        """
        sample = self.accounts[:PROBE_USERS]
        sampled = await asyncio.gather(
            *(
                asyncio.gather(*(self._expiry(broker, user) for user in sample))
                for broker in self.nodes.values()
            )
        )
        before = dict(zip(self.nodes, sampled, strict=True))
        probed_at = time.monotonic()
        # At once, as a crash or a power cut would: a fast stop can take seconds, and tokens
        # live for six.
        await asyncio.to_thread(self.pg.stop, "immediate")
        self.stop_seconds = time.monotonic() - probed_at
        try:
            await asyncio.gather(
                *(
                    self._probe(name, broker, sample, before[name], traffic)
                    for name, broker in self.nodes.items()
                )
            )
            await asyncio.sleep(max(0.0, min(seconds, 12) - (time.monotonic() - probed_at)))
            for name, broker in self.nodes.items():
                ready = await asyncio.to_thread(request, broker.socket, "GET", "/readyz")
                self.readyz_down.append((name, ready.status, ready.body.decode()[:300]))
            await asyncio.sleep(max(0.0, seconds - (time.monotonic() - probed_at)))
        finally:
            await asyncio.to_thread(self.pg.start)

    async def _probe(
        self,
        name: str,
        broker: BrokerProcess,
        sample: list[str],
        expiries: list[float | None],
        traffic: Traffic,
    ) -> None:
        """Ask `broker`, with the store down, for each grant of `sample` whose token still has
        PROBE_LEFT seconds to live (by its expires_at); record what was served and refused."""
        now = time.time()
        alive = [
            user
            for user, expires in zip(sample, expiries, strict=True)
            if expires is not None and expires - now >= PROBE_LEFT
        ]
        replies = await asyncio.gather(*(self._sent(broker, user) for user in alive))
        self.outage_probed[name] = len(alive)
        for user, (sent, reply) in zip(alive, replies, strict=True):
            if reply.status != 200:
                detail = str(reply.json().get("detail", ""))[:120]
                self.outage_refused[name].append((user, reply.status, detail))
                continue
            self.outage_serves[name] += 1
            await self._check(name, user, reply.json(), sent, traffic)

    @staticmethod
    async def _sent(broker: BrokerProcess, user: str) -> tuple[float, Reply]:
        """When the request for `user`'s token was sent, and its reply."""
        sent = time.time()
        return sent, await broker.token(user)

    @staticmethod
    async def _expiry(broker: BrokerProcess, user: str) -> float | None:
        """When the token `broker` serves for `user` now expires (epoch seconds: every broker
        dates expiries by the database's clock, which is this host's); None if none is served."""
        reply = await broker.token(user)
        if reply.status != 200:
            return None
        expires_at = str(reply.json()["expires_at"]).replace("Z", "+00:00")
        return datetime.fromisoformat(expires_at).timestamp()

    async def _check(
        self, node: str, user: str, body: dict[str, Any], sent: float, traffic: Traffic
    ) -> None:
        """Send a newly served token to the IdP's userinfo; record a rejection, and a token
        served with less than its grant's min_margin to live."""
        token = body["access_token"]
        if token in traffic.served:
            return
        traffic.served[token] = (user, sent)
        traffic.served_by[token] = node
        # Every broker dates expiries by the database's clock, node c's too.
        expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00")).timestamp()
        if expires - time.time() < MIN_MARGIN:
            traffic.near_expiry += 1
        if await self.userinfo.status(token) != 200:
            traffic.rejected.append((user, token, sent, time.time(), expires))

    # -- after the run ------------------------------------------------------------------------

    def calls(self) -> list[RefreshCall]:
        """Every broker's refresh calls, their times moved onto the real clock."""
        found: list[RefreshCall] = []
        for name, broker in self.nodes.items():
            offset = SKEW if name == "c" else 0.0
            for call in refresh_calls(log_events(broker.log(), "refresh")):
                found.append(
                    RefreshCall(
                        call.user,
                        call.start - offset,
                        call.end - offset,
                        call.outcome,
                        call.generation,
                    )
                )
        return found

    def split(self) -> dict[str, int]:
        """Successful refreshes by node."""
        return {
            name: sum(
                1 for e in log_events(broker.log(), "refresh") if e.get("outcome") == "success"
            )
            for name, broker in self.nodes.items()
        }

    async def lag(self) -> dict[str, float]:
        """p50 and p99 of fleet_change_lag_seconds over every node's current incarnation."""
        buckets: dict[float, float] = defaultdict(float)
        count = 0.0
        for broker in self.nodes.values():
            metrics = await broker.metrics()
            for (name, labels), value in metrics.items():
                if name == "token_broker_fleet_change_lag_seconds_bucket":
                    bound = dict(labels)["le"]
                    buckets[float("inf") if bound == "+Inf" else float(bound)] += value
                elif name == "token_broker_fleet_change_lag_seconds_count":
                    count += value
        return {
            "samples": count,
            "p50_ms": round(_quantile(buckets, count, 0.5) * 1000, 1),
            "p99_ms": round(_quantile(buckets, count, 0.99) * 1000, 1),
        }

    async def states(self) -> Counter[str]:
        """Grants by state (and rotation_lost) as the first broker sees them."""
        grants = await self.nodes["a"].grants()
        return Counter(
            "rotation_lost"
            if (g["last_error"] or "").startswith("rotation_lost")
            else str(g["state"])
            for g in grants.values()
        )


def _quantile(buckets: dict[float, float], count: float, q: float) -> float:
    """Quantile `q` of a histogram's cumulative buckets as PromQL's histogram_quantile gives it
    (what a dashboard of the metric shows): linear within the bucket that holds it; in the +Inf
    bucket, the highest finite bound."""
    if count <= 0:
        return 0.0
    rank = q * count
    lower, below = 0.0, 0.0
    for bound in sorted(buckets):
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            inside = buckets[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, buckets[bound]
    return lower


def unexcused(traffic: Traffic, calls: Sequence[RefreshCall]) -> list[str]:
    """Rejected tokens that neither a refresh begun after their request nor their expiry
    explains, each described:
    who served it, when it was asked for, and the grant's last refresh call before that."""
    by_user: dict[str, list[RefreshCall]] = defaultdict(list)
    for call in calls:
        by_user[call.user].append(call)
    wrong = []
    for user, token, sent, done, expires in traffic.rejected:
        if any(sent < call.start <= done for call in by_user[user]):
            continue  # the provider deleted it: a refresh began after it was asked for
        if done >= expires - EXPIRY_TOLERANCE:
            continue  # it expired before the IdP checked it: it lived when it was served
        before = [call for call in by_user[user] if call.start <= sent]
        last = max(before, key=lambda call: call.start) if before else None
        wrong.append(
            f"{user} served by {traffic.served_by.get(token)} for a request at "
            f"{datetime.fromtimestamp(sent, UTC):%H:%M:%S.%f}; last refresh before it: "
            + (
                "none"
                if last is None
                else f"{datetime.fromtimestamp(last.start, UTC):%H:%M:%S.%f} to "
                f"{datetime.fromtimestamp(last.end, UTC):%H:%M:%S.%f}, {last.outcome}"
            )
        )
    return wrong


@contextlib.asynccontextmanager
async def fleet(
    idp_factory: DjangoIdPFactory, log_dir: Path, root: Path, grace: int
) -> AsyncIterator[FleetRun]:
    """Three brokers on a PostgreSQL cluster of the test's own, at a real IdP."""
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    if find_libfaketime() is None:
        pytest.skip("libfaketime not found: apt-get install faketime")
    server: PostgresServer = await asyncio.to_thread(start_postgres, root)
    try:
        pg = PrivatePostgres(server)
        idp = await asyncio.to_thread(
            idp_factory,
            redirect_uris=[REGISTERED_REDIRECT],
            access_token_lifetime=LIFETIME,
            refresh_grace=grace,
            reuse_protection=True,
            users=users(GRANTS),
        )
        clock = FakeClock(Path(tempfile.mkdtemp(prefix="clock-", dir=root)), offset=SKEW)
        async with installation(idp, log_dir, pg.new_database()) as inst:
            run = FleetRun(idp, inst, pg, clock)
            await run.start(grace)
            yield run
            await run.userinfo.close()
    finally:
        await asyncio.to_thread(server.stop)


def check_common(run: FleetRun, traffic: Traffic, stats: dict[str, Any]) -> dict[str, Any]:
    """The checks every run makes; the numbers it reports."""
    calls = run.calls()
    wrong = unexcused(traffic, calls)
    delta = stats_delta(stats, run.idp.stats())
    split = run.split()
    total = sum(split.values())
    numbers = {
        "requests": traffic.requests,
        "statuses": dict(traffic.statuses),
        "tokens_served": len(traffic.served),
        "rejected": len(traffic.rejected),
        "rejected_unexcused": len(wrong),
        "served_near_expiry": traffic.near_expiry,
        "reuse_detections": delta.get("reuse_family_revocations", 0),
        "refreshes": total,
        "split": {name: f"{count} ({count / max(total, 1):.0%})" for name, count in split.items()},
    }
    assert numbers["reuse_detections"] == 0, numbers
    assert traffic.statuses[500] == 0, numbers
    assert wrong == [], "\n".join([str(numbers), *wrong])
    return numbers


async def test_three_brokers_share_the_work_and_never_serve_a_rotated_token_through_outages(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """Three brokers, one 3 s ahead, keep 30 six-second grants fresh for two minutes: no
    reuse, no rejected token, no 500, every broker doing at least a fifth of the refreshes, the
    change lag's p99 under 100 ms; the database stopped for 20 s and later restarted costs no
    grant, every broker keeps serving, says 503 on /readyz while it is down, and recovers."""
    async with fleet(django_idp_factory, log_dir, tmp_path, grace=0) as run:
        stats = run.idp.stats()
        traffic = Traffic()
        stop = asyncio.Event()
        background = Tasks()
        tasks = [background.spawn(run.clients(SECONDS, traffic, stop), "clients")]
        await asyncio.sleep(SECONDS * 0.3)
        lag_before_outage = await run.lag()
        await run.outage(OUTAGE, traffic)
        await asyncio.sleep(SECONDS * 0.2)
        await asyncio.to_thread(run.pg.restart)
        await asyncio.gather(*tasks)
        await asyncio.sleep(2)
        numbers = check_common(run, traffic, stats)
        states = await run.states()
        ready_after = {
            name: (await asyncio.to_thread(request, b.socket, "GET", "/readyz")).status
            for name, b in run.nodes.items()
        }
        lag = await run.lag()
    numbers |= {
        "grants": dict(states),
        "outage_probe": {
            name: f"{run.outage_serves[name]} of {run.outage_probed[name]} served" for name in NODES
        },
        "outage_refused": dict(run.outage_refused),
        "database_stop_seconds": round(run.stop_seconds, 2),
        "readyz_during_outage": [(n, s) for n, s, _ in run.readyz_down],
        "readyz_after": ready_after,
        "lag_before_outage": lag_before_outage,
        "lag_whole_run": lag,
    }
    report("fleet", numbers)
    assert states == Counter({"active": GRANTS}), numbers
    split = run.split()
    assert min(split.values()) >= 0.2 * sum(split.values()), numbers
    assert all(status == 503 for _, status, _ in run.readyz_down), run.readyz_down
    assert all("store" in body or "fleet" in body for _, _, body in run.readyz_down)
    assert all(run.outage_probed[name] > 0 for name in NODES), numbers
    unexcused = [
        (name, refusal)
        for name, refusals in run.outage_refused.items()
        for refusal in refusals
        if not any(reason in refusal[2] for reason in ROTATION_IN_FLIGHT)
    ]
    assert not unexcused, numbers
    assert all(run.outage_serves[name] > 0 for name in NODES), numbers
    assert ready_after == dict.fromkeys(NODES, 200), numbers
    assert lag_before_outage["p99_ms"] < 100, numbers


@pytest.mark.parametrize("grace", [30, 0])
async def test_a_broker_killed_every_ten_seconds_costs_no_grant_beyond_its_calls_in_flight(
    grace: int, tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """One of three brokers is SIGKILLed every 10 s and restarted: with 30 s of grace no grant
    is lost (the others recover its interrupted refreshes inside the grace); without grace,
    at most the grants whose refresh the killed broker had at the provider."""
    async with fleet(django_idp_factory, log_dir, tmp_path, grace=grace) as run:
        stats = run.idp.stats()
        traffic = Traffic()
        stop = asyncio.Event()
        until = time.monotonic() + SECONDS
        await asyncio.gather(
            run.clients(SECONDS, traffic, stop), run.kill_every("b", KILL_EVERY, until)
        )
        await asyncio.sleep(2)
        numbers = check_common(run, traffic, stats)
        states = await run.states()
    in_flight = sum(count for _, count in run.kills)
    numbers |= {
        "grants": dict(states),
        "kills": len(run.kills),
        "refreshes_in_flight_at_kills": in_flight,
    }
    report(f"fleet_kills_grace_{grace}", numbers)
    assert run.kills, "no kill happened"
    if grace:
        assert states == Counter({"active": GRANTS}), numbers
    else:
        assert states["rotation_lost"] <= in_flight, numbers
        assert states["active"] + states["rotation_lost"] == GRANTS, numbers
