"""Soak tests of the refresher against the real django-oauth-toolkit IdP (tests/idp).

Real `token-broker serve` processes keep grants with 5-second access tokens fresh while client
loops fetch tokens over the Unix socket. What is checked comes from outside the broker: the
IdP's /test/stats (refreshes done, spent refresh tokens presented, family revocations), the
IdP's userinfo endpoint (is a served token alive), each request's latency, and the refresh
calls the broker logs (event "refresh": its end time and the call's duration).

How "every served token is valid" is checked soundly: DOT deletes an access token the moment it
rotates the refresh token that minted it, so a token can die a millisecond after it was served
through no fault of the broker. The broker's promise is narrower and checkable: it never hands
out a token that has *already* been rotated away. So

- every distinct token is sent to userinfo as soon as a client first receives it; a 401 is a
  failure unless the broker's log shows a refresh of that grant that *started after the client
  sent its request* (the rotation began after the token was served);
- every request is also checked for staleness: once a client has received a grant's newer
  token (so a broker had committed it), no request sent afterwards may return an older one.

Latency: a request whose grant is being rotated at that moment waits for the rotation (one IdP
round trip), by design: DOT has deleted (or is about to delete) the old token, and the new one
is not known yet, so no valid token exists to answer with. Requests are therefore split into
those that overlapped a refresh call of their grant (widened by NEAR for the intent write before
and the commit after the call) and the rest; the rest must be answered from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker.tasks import Tasks
from tests.idp import fixture as idp_fixture
from tests.idp.fixture import DjangoIdPFactory
from tests.rotation_harness import (
    REGISTERED_REDIRECT,
    BrokerProcess,
    RefreshCall,
    RefreshSettings,
    UserInfo,
    installation,
    refresh_calls,
    report,
    stats_delta,
    users,
)

django_idp_factory = idp_fixture.django_idp_factory

pytestmark = pytest.mark.slow

LIFETIME = 5  # seconds an access token lives at the IdP
SETTINGS = RefreshSettings(lifetime_fraction=0.5, min_margin="1s", jitter=0.1, max_concurrency=8)
SOAK_SECONDS = 60.0
CLIENT_PAUSE = 0.02  # between one client loop's requests: ~50 requests/s per loop at most
NEAR = 0.05  # seconds around a logged refresh call: the intent write before, the commit after
# Generous on purpose: two cores run the IdP, the broker, eight client loops and the userinfo
# checks, and a loaded CI machine stretches every number. The exact numbers are reported;
# what the assertions prove is structural (no caller waited beyond a refresh in flight).
MEMORY_P99 = 0.25  # seconds; answered from memory takes ~2 ms unloaded, one IdP call ~20 ms
MEMORY_P100 = 1.0  # a stall of the machine, not an IdP call
# A histogram bucket bound of token_request_duration_seconds. Near its refresh time a request
# also reads the grant's row (one primary-key read), which a disk busy with the refreshes'
# fsyncs can hold up for tens of milliseconds; only a wait on the IdP takes longer than this.
SLOW_SERVER_SIDE = "0.25"


@dataclass(frozen=True, slots=True)
class Serve:
    """One GET /v1/tokens as a client saw it."""

    broker: str
    user: str
    token: str
    sent: float  # epoch seconds
    received: float
    latency: float  # seconds, perf_counter
    expires_in: int


@dataclass(frozen=True, slots=True)
class Check:
    """The userinfo check of a token right after a client first received it."""

    user: str
    token: str
    served_sent: float
    done: float
    status: int


@dataclass
class Traffic:
    """Everything the client loops saw."""

    serves: list[Serve] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


async def client_loop(
    broker: BrokerProcess,
    *,
    userinfo: UserInfo,
    accounts: Sequence[str],
    traffic: Traffic,
    deadline: float,
    rng: random.Random,
) -> None:
    """Fetch random grants' tokens until `deadline`; check each new token at once."""
    while time.monotonic() < deadline:
        user = rng.choice(accounts)
        sent, started = time.time(), time.perf_counter()
        reply = await broker.token(user)
        latency, received = time.perf_counter() - started, time.time()
        if reply.status != 200:
            traffic.failures.append(f"{broker.name} {user}: {reply.status} {reply.body[:200]!r}")
            await asyncio.sleep(CLIENT_PAUSE)
            continue
        body = reply.json()
        token = body["access_token"]
        traffic.serves.append(
            Serve(broker.name, user, token, sent, received, latency, int(body["expires_in"]))
        )
        if token not in traffic.seen:
            traffic.seen.add(token)
            status = await userinfo.status(token)
            traffic.checks.append(Check(user, token, sent, time.time(), status))
        await asyncio.sleep(CLIENT_PAUSE)


async def run_clients(
    brokers: Sequence[BrokerProcess],
    userinfo: UserInfo,
    accounts: Sequence[str],
    *,
    loops_per_broker: int,
    seconds: float,
    seed: int,
) -> Traffic:
    """`loops_per_broker` client loops on each broker for `seconds`."""
    traffic = Traffic()
    deadline = time.monotonic() + seconds
    loops = [broker for broker in brokers for _ in range(loops_per_broker)]
    await asyncio.gather(
        *(
            client_loop(
                broker,
                userinfo=userinfo,
                accounts=accounts,
                traffic=traffic,
                deadline=deadline,
                rng=random.Random(seed + i),
            )
            for i, broker in enumerate(loops)
        )
    )
    return traffic


@dataclass
class Verdict:
    """What the traffic shows, measured against the brokers' refresh calls."""

    unexcused_401: list[Check]
    excused_401: list[Check]
    stale: list[Serve]
    joined: list[tuple[Serve, float]]  # overlapped a refresh of its grant; that call's seconds
    plain: list[Serve]  # the others


def judge(traffic: Traffic, calls: Sequence[RefreshCall]) -> Verdict:
    """Classify the userinfo checks and the serves (see the module docstring)."""
    by_user: dict[str, list[RefreshCall]] = defaultdict(list)
    for call in calls:
        by_user[call.user].append(call)
    unexcused: list[Check] = []
    excused: list[Check] = []
    for check in traffic.checks:
        if check.status == 200:
            continue
        rotated_after = any(
            check.served_sent < call.start <= check.done for call in by_user[check.user]
        )
        (excused if rotated_after else unexcused).append(check)
    # Staleness: the order in which each grant's tokens first reached a client.
    first_received: dict[str, tuple[float, str]] = {}
    for serve in traffic.serves:
        at = first_received.get(serve.token, (serve.received, serve.user))[0]
        first_received[serve.token] = (min(at, serve.received), serve.user)
    tokens_of: dict[str, list[tuple[float, str]]] = defaultdict(list)  # user -> (first, token)
    for token, (at, user) in first_received.items():
        tokens_of[user].append((at, token))
    rank: dict[str, int] = {}
    for items in tokens_of.values():
        items.sort()
        rank.update((token, index) for index, (_, token) in enumerate(items))
    stale = []
    for serve in traffic.serves:
        # The newest of this grant's tokens that some client had received before this request.
        known = [rank[token] for at, token in tokens_of[serve.user] if at < serve.sent]
        if known and rank[serve.token] < max(known):
            stale.append(serve)
    joined, plain = [], []
    for serve in traffic.serves:
        overlapping = [
            call.end - call.start
            for call in by_user[serve.user]
            if call.start - NEAR <= serve.received and call.end + NEAR >= serve.sent
        ]
        if overlapping:
            joined.append((serve, max(overlapping)))
        else:
            plain.append(serve)
    return Verdict(unexcused, excused, stale, joined, plain)


PROBE_STEP = 0.01  # seconds between the probes' wake-ups
# A separate process that sleeps PROBE_STEP at a time for `seconds` and prints the longest
# oversleep: how long this machine stopped running processes (a hypervisor's steal, say).
_STALL_PROBE = """
import sys, time
seconds, step = float(sys.argv[1]), float(sys.argv[2])
worst, end = 0.0, time.monotonic() + seconds
while time.monotonic() < end:
    before = time.monotonic()
    time.sleep(step)
    worst = max(worst, time.monotonic() - before - step)
print(worst)
"""


@dataclass
class Stalls:
    """The longest stalls (seconds) while the clients ran: the machine's, seen by a separate
    process, and the clients' own event loop's (the test process), seen by a task on it."""

    machine: float = 0.0
    client: float = 0.0

    @property
    def worst(self) -> float:
        """The longest time a caller's latency grew for a reason outside the broker."""
        return max(self.machine, self.client)


async def _loop_lag(deadline: float) -> float:
    """The longest oversleep of a PROBE_STEP sleep on this event loop until `deadline`."""
    worst = 0.0
    while time.monotonic() < deadline:
        before = time.monotonic()
        await asyncio.sleep(PROBE_STEP)
        worst = max(worst, time.monotonic() - before - PROBE_STEP)
    return worst


@contextlib.asynccontextmanager
async def measured_stalls(seconds: float) -> AsyncIterator[Stalls]:
    """The machine's and the client loop's longest stalls while the block ran (bounded probes).

    The test process has gathered the whole suite's objects by the time a soak test runs, and a
    full garbage collection of them holds the client loops for up to a second, which a caller's
    measured latency would blame on the broker. They are frozen out of collections (`gc.freeze`)
    while the block runs, as the daemon does with its own; what still stalls the client loop is
    measured and allowed for, as the machine's stalls are. A stall of the broker is not."""
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _STALL_PROBE,
        str(seconds),
        str(PROBE_STEP),
        stdout=asyncio.subprocess.PIPE,
    )
    stalls = Stalls()
    gc.collect()
    gc.freeze()
    lag = Tasks().spawn(_loop_lag(time.monotonic() + seconds), "client loop lag probe")
    try:
        yield stalls
    finally:
        gc.unfreeze()
        stalls.client = await lag
        out, _ = await probe.communicate()
        stalls.machine = float(out or 0)


def latency_numbers(serves: Sequence[Serve]) -> dict[str, float]:
    """Count, median, p99 and maximum latency in milliseconds."""
    if not serves:
        return {"n": 0}
    values = sorted(s.latency for s in serves)
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 2),
        "p99_ms": round(values[max(0, int(len(values) * 0.99) - 1)] * 1000, 2),
        "p100_ms": round(values[-1] * 1000, 2),
    }


def schedule_intervals(calls: Sequence[RefreshCall]) -> list[float]:
    """Seconds between the starts of consecutive successful refreshes of each grant."""
    by_user: dict[str, list[float]] = defaultdict(list)
    for call in calls:
        if call.outcome == "success":
            by_user[call.user].append(call.start)
    return [b - a for starts in by_user.values() for a, b in itertools.pairwise(starts)]


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


async def test_twenty_grants_stay_fresh_for_a_minute_with_every_token_valid_and_served_from_memory(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """Twenty grants with 5 s tokens, fetched by 8 client loops for 60 s: every served token is
    alive when served, refreshes run on schedule so callers are answered from memory, and the
    IdP never sees a spent refresh token."""
    accounts = users(20)
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=LIFETIME, users=accounts
    )
    userinfo = UserInfo(idp)
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("soak", refresh=SETTINGS)
        broker.start()
        await broker.log_in_all(accounts)
        before, started = idp.stats(), time.time()
        async with measured_stalls(SOAK_SECONDS) as stalls:
            traffic = await run_clients(
                [broker], userinfo, list(accounts), loops_per_broker=8, seconds=SOAK_SECONDS, seed=1
            )
        ended, after = time.time(), idp.stats()
        delta = stats_delta(before, after)
        metrics = await broker.metrics()
        grants = await broker.grants()
    await userinfo.close()

    calls = refresh_calls(broker.events("refresh"))
    window = [c for c in calls if started <= c.start <= ended]
    verdict = judge(traffic, calls)
    intervals = schedule_intervals(calls)
    mean_interval = LIFETIME * SETTINGS.lifetime_fraction * (1 - SETTINGS.jitter / 2)
    expected = len(accounts) * SOAK_SECONDS / mean_interval
    histogram = "token_broker_token_request_duration_seconds"
    slow_server_side = (
        metrics[(f"{histogram}_count", ())]
        - metrics[(f"{histogram}_bucket", (("le", SLOW_SERVER_SIDE),))]
    )
    call_ms = [round((c.end - c.start) * 1000, 1) for c in window]
    waits_beyond_call = [s.latency - seconds for s, seconds in verdict.joined]
    report(
        "soak",
        {
            "grants": len(accounts),
            "requests": len(traffic.serves),
            "distinct_tokens_checked": len(traffic.checks),
            "userinfo_401_excused": len(verdict.excused_401),
            "userinfo_401_unexcused": len(verdict.unexcused_401),
            "stale_serves": len(verdict.stale),
            "refresh_ok": delta["refresh_ok"],
            "refresh_expected": round(expected),
            "broker_refresh_calls": len(window),
            "idp_call_ms_p50": statistics.median(call_ms),
            "idp_call_ms_max": max(call_ms),
            "latency_all": latency_numbers(traffic.serves),
            "latency_from_memory": latency_numbers(verdict.plain),
            "latency_overlapping_a_refresh": latency_numbers([s for s, _ in verdict.joined]),
            "max_wait_beyond_the_call_ms": round(max(waits_beyond_call, default=0) * 1000, 1),
            f"server_side_over_{SLOW_SERVER_SIDE}s": slow_server_side,
            "refresh_interval_s_min": round(min(intervals), 2),
            "refresh_interval_s_max": round(max(intervals), 2),
            "min_expires_in": min(s.expires_in for s in traffic.serves),
            "machine_stall_max_s": round(stalls.machine, 3),
            "client_loop_stall_max_s": round(stalls.client, 3),
            "idp": delta,
        },
    )

    assert not traffic.failures, traffic.failures[:5]
    assert len(traffic.checks) >= 0.8 * expected
    assert not verdict.unexcused_401, verdict.unexcused_401[:3]
    assert not verdict.stale, verdict.stale[:3]
    # Never a spent refresh token, never two requests racing on one token.
    assert delta["spent_refresh_presented"] == 0
    assert delta["reuse_family_revocations"] == 0
    assert delta["same_pair_returned"] == 0
    assert after["refresh_failed"] == before["refresh_failed"]
    assert 0.85 * expected <= delta["refresh_ok"] <= 1.15 * expected
    # Refreshes ran on the schedule: at half of each 5 s life (jitter moves them earlier),
    # never at expiry, where a refresh that a caller needed would happen.
    # The upper bounds allow for the longest time the machine stood still meanwhile (measured
    # by a separate process), which delays the broker's timers no matter what it does.
    stall = stalls.machine
    assert all(c.outcome == "success" for c in calls)
    low = LIFETIME * SETTINGS.lifetime_fraction * (1 - SETTINGS.jitter)
    assert low - 0.05 <= min(intervals)
    assert max(intervals) < LIFETIME * SETTINGS.lifetime_fraction + 1.5 + stall
    assert min(s.expires_in for s in traffic.serves) >= (1 if stall < 0.5 else 0)
    # Latency as the callers measured it also grows with their own loop's stalls.
    stall = stalls.worst
    # Callers were answered from memory; only those that arrived while their grant's token was
    # at the IdP waited, and for no longer than that one call.
    memory = latency_numbers(verdict.plain)
    assert memory["p99_ms"] < (MEMORY_P99 + stall) * 1000
    assert memory["p100_ms"] < (MEMORY_P100 + stall) * 1000
    assert max(waits_beyond_call, default=0) < MEMORY_P100 + stall
    assert slow_server_side <= len(verdict.joined)
    assert all(g["state"] == "active" and g["has_refresh_token"] for g in grants.values())


async def test_a_caller_arriving_while_its_grant_is_at_the_idp_waits_for_the_new_token(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """A GET that arrives while its grant's refresh is at the IdP waits for that refresh and
    gets the new token: DOT has already deleted the old one, so there is nothing valid to
    serve from memory in that window."""
    idp = django_idp_factory(redirect_uris=[REGISTERED_REDIRECT], users=users(1))
    userinfo = UserInfo(idp)
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("window", refresh=SETTINGS)
        broker.start()
        await broker.log_in_all(users(1))
        old = (await broker.token("u00")).json()["access_token"]
        before = idp.stats()["refresh_ok"]
        idp.faults(token_delay=1.5, count=1)  # DOT rotates at once, answers 1.5 s later
        tasks = Tasks()
        refresh = tasks.spawn(broker.refresh("u00"), "admin refresh")
        for _ in range(100):
            if idp.stats()["refresh_ok"] > before:
                break
            await asyncio.sleep(0.02)
        old_status = await userinfo.status(old)
        started = time.perf_counter()
        reply = await broker.token("u00")
        waited = time.perf_counter() - started
        assert (await refresh).status == 200
        new = reply.json()["access_token"]
        new_status = await userinfo.status(new)
    await userinfo.close()
    report("rotation_window", {"old_token_status": old_status, "waited_s": round(waited, 2)})
    assert old_status == 401
    assert reply.status == 200
    assert new != old
    assert new_status == 200
    assert 0.5 < waited < 3.0


async def test_five_hundred_callers_needing_more_life_than_is_left_share_one_refresh(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """500 concurrent GETs with a min_ttl longer than the token's remaining life cause exactly
    one refresh at the IdP, and all 500 get the same new token."""
    lifetime, min_ttl = 30, 27
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=lifetime, users=users(1)
    )
    settings = RefreshSettings(lifetime_fraction=0.75, min_margin="1s", jitter=0.1)
    userinfo = UserInfo(idp)
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("min-ttl", refresh=settings)
        broker.start()
        await broker.log_in_all(users(1))
        # Wait until the token has less than min_ttl left and is older than the broker's 5 s
        # minimum between caller-driven refreshes; the schedule would refresh it at ~20 s.
        for _ in range(60):
            first = (await broker.token("u00")).json()
            if first["expires_in"] < min_ttl - 3:
                break
            await asyncio.sleep(0.25)
        old = first["access_token"]
        before = idp.stats()
        # The IdP holds its answer back for a second, so all 500 requests are in flight while
        # the one refresh runs.
        idp.faults(token_delay=1.0, count=1)
        started = time.time()
        replies = await asyncio.gather(*(broker.token("u00", min_ttl) for _ in range(500)))
        elapsed = time.time() - started
        delta = stats_delta(before, idp.stats())
        served = [r.json() for r in replies if r.status == 200]
        new_tokens = {body["access_token"] for body in served}
        new = next(iter(new_tokens), "")
        new_status, old_status = await userinfo.status(new), await userinfo.status(old)
    await userinfo.close()

    calls = [c for c in refresh_calls(broker.events("refresh")) if c.start >= started]
    report(
        "min_ttl",
        {
            "requests": len(replies),
            "statuses": sorted({r.status for r in replies}),
            "distinct_tokens": len(new_tokens),
            "refresh_ok_delta": delta["refresh_ok"],
            "broker_refresh_calls": len(calls),
            "elapsed_s": round(elapsed, 2),
            "min_expires_in": min((body["expires_in"] for body in served), default=0),
        },
    )
    assert [r.status for r in replies] == [200] * 500
    assert len(new_tokens) == 1
    assert new != old
    assert min(body["expires_in"] for body in served) >= min_ttl
    assert delta["refresh_ok"] == 1
    assert delta["spent_refresh_presented"] == 0
    assert delta["same_pair_returned"] == 0
    assert len(calls) == 1
    assert (new_status, old_status) == (200, 401)


async def test_two_brokers_on_one_store_never_present_a_spent_refresh_token(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """Two broker processes on one SQLite store, both serving clients for 60 s with 5 s
    tokens: the IdP never sees a spent refresh token, and every grant is usable from both at
    the end."""
    accounts = users(12)
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=LIFETIME, users=accounts
    )
    userinfo = UserInfo(idp)
    async with installation(idp, log_dir) as inst:
        first = inst.broker("one", refresh=SETTINGS)
        assert first.callback_port is not None
        second = inst.broker(
            "two", refresh=SETTINGS, callback=False, redirect_port=first.callback_port
        )
        first.start()
        second.start()
        await first.log_in_all(accounts)
        # The second broker learns of grants stored by the first from the store (each pass of
        # its schedule loop, at least once a second).
        for _ in range(50):
            statuses = [(await second.token(user)).status for user in accounts]
            if statuses == [200] * len(accounts):
                break
            await asyncio.sleep(0.1)
        before, started = idp.stats(), time.time()
        traffic = await run_clients(
            [first, second],
            userinfo,
            list(accounts),
            loops_per_broker=4,
            seconds=SOAK_SECONDS,
            seed=100,
        )
        ended = time.time()
        delta = stats_delta(before, idp.stats())
        # Make new tokens long-lived so the end state holds still, then check it from both.
        idp.settings(access_token_lifetime=3600)
        for _ in range(100):
            listed = await first.grants()
            if all(g["access_expires_at"] >= _iso(time.time() + 1000) for g in listed.values()):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.5)  # both brokers' schedule loops have reloaded the store
        end_state = {}
        for user in accounts:
            one, two = await first.token(user), await second.token(user)
            tokens = (one.json()["access_token"], two.json()["access_token"])
            end_state[user] = (
                one.status,
                two.status,
                tokens[0] == tokens[1],
                await userinfo.status(tokens[0]),
                await userinfo.status(tokens[1]),
            )
        final = await first.grants()
        final_delta = stats_delta(before, idp.stats())
    await userinfo.close()

    calls = refresh_calls(first.events("refresh") + second.events("refresh"))
    by_broker = {
        b.name: len([c for c in refresh_calls(b.events("refresh")) if started <= c.start <= ended])
        for b in (first, second)
    }
    verdict = judge(traffic, calls)
    successes: dict[str, list[RefreshCall]] = defaultdict(list)
    for call in calls:
        if call.outcome == "success":
            successes[call.user].append(call)
    back_to_back = sum(
        1 for cs in successes.values() for a, b in itertools.pairwise(cs) if b.start - a.end < 1.0
    )
    report(
        "two_brokers",
        {
            "grants": len(accounts),
            "requests": len(traffic.serves),
            "distinct_tokens_checked": len(traffic.checks),
            "userinfo_401_excused": len(verdict.excused_401),
            "userinfo_401_unexcused": len(verdict.unexcused_401),
            "stale_serves": len(verdict.stale),
            "stale_by_broker": {
                b: sum(1 for s in verdict.stale if s.broker == b) for b in ("one", "two")
            },
            "refresh_ok": delta["refresh_ok"],
            "refreshes_by_broker": by_broker,
            "refreshes_under_1s_after_the_previous": back_to_back,
            "latency_all": latency_numbers(traffic.serves),
            "failures": len(traffic.failures),
            "idp": final_delta,
        },
    )
    assert final_delta["spent_refresh_presented"] == 0
    assert final_delta["reuse_family_revocations"] == 0
    assert final_delta["same_pair_returned"] == 0
    assert not traffic.failures, traffic.failures[:5]
    assert all(g["state"] == "active" and g["has_refresh_token"] for g in final.values())
    assert end_state == dict.fromkeys(accounts, (200, 200, True, 200, 200))


@pytest.mark.parametrize(
    "store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_a_broker_never_serves_a_token_that_another_broker_on_its_store_rotated_away(
    tmp_path: Path,
    log_dir: Path,
    django_idp_factory: DjangoIdPFactory,
    store: str,
    request: pytest.FixtureRequest,
) -> None:
    """While one broker's off-schedule refresh (an admin's) is at the IdP and right after it
    commits, a second broker on the same store serves a token the IdP accepts, not the one
    just rotated away: the claim is announced to it before the token leaves (SQLite shared by
    two processes: the change sequence, polled closely while a peer lives; PostgreSQL: NOTIFY)."""
    idp = django_idp_factory(redirect_uris=[REGISTERED_REDIRECT], users=users(1))
    userinfo = UserInfo(idp)
    store_url = None if store == "sqlite" else request.getfixturevalue("postgres_url")
    async with installation(idp, log_dir, store_url) as inst:
        first = inst.broker("one", refresh=SETTINGS)
        assert first.callback_port is not None
        second = inst.broker(
            "two", refresh=SETTINGS, callback=False, redirect_port=first.callback_port
        )
        first.start()
        second.start()
        await first.log_in_all(users(1))
        for _ in range(50):
            if (await second.token("u00")).status == 200:
                break
            await asyncio.sleep(0.1)
        old = (await second.token("u00")).json()["access_token"]
        before = idp.stats()["refresh_ok"]
        idp.faults(token_delay=1.5, count=1)  # DOT rotates at once, answers 1.5 s later
        tasks = Tasks()
        refresh = tasks.spawn(first.refresh("u00"), "admin refresh")
        for _ in range(100):
            if idp.stats()["refresh_ok"] > before:
                break
            await asyncio.sleep(0.02)
        during = (await second.token("u00")).json()["access_token"]
        during_status = await userinfo.status(during)
        assert (await refresh).status == 200
        after = (await second.token("u00")).json()["access_token"]
        after_status = await userinfo.status(after)
    await userinfo.close()
    report(
        "second_broker_stale",
        {
            "during_is_old": during == old,
            "during_status": during_status,
            "after_is_old": after == old,
            "after_status": after_status,
        },
    )
    assert (during_status, after_status) == (200, 200)
