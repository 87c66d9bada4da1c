"""An IdP outage longer than the access tokens live, against the real django-oauth-toolkit IdP.

A real `token-broker serve` keeps ten grants with 10-second tokens fresh; the IdP process is
stopped for 20 seconds (`DjangoIdP.stop()`), then started again on the same port and database
(`restart()`). Clients poll every grant's token throughout.

How "at most max_concurrency refreshes in flight" is measured: after the restart the IdP holds
every token response back for DRAIN_DELAY seconds (/test/faults token_delay), so each refresh
keeps its TCP connection open that long; a thread samples the broker process's ESTABLISHED
connections to the IdP's port from /proc every 10 ms (`IdpConnectionSampler`; the broker opens
one connection per call and closes it after the answer). The broker's own log gives a second
measure: the overlap of its "refresh" calls (end time and duration).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.idp import fixture as idp_fixture
from tests.idp.fixture import DjangoIdPFactory
from tests.rotation_harness import (
    REGISTERED_REDIRECT,
    IdpConnectionSampler,
    RefreshSettings,
    UserInfo,
    installation,
    max_overlap,
    refresh_calls,
    report,
    stats_delta,
    users,
)

django_idp_factory = idp_fixture.django_idp_factory

pytestmark = pytest.mark.slow

GRANTS = 10
LIFETIME = 10
OUTAGE = 20.0
MAX_CONCURRENCY = 2
SETTINGS = RefreshSettings(
    lifetime_fraction=0.5, min_margin="1s", jitter=0.1, max_concurrency=MAX_CONCURRENCY
)
POLL = 0.25  # seconds between the clients' rounds of GETs
DRAIN_DELAY = 0.5  # seconds the restarted IdP holds each token response back
# Back-off after transient failures is 5 s, 10 s, 20 s, 40 s ... with equal jitter, so a grant
# that first failed early in a 20 s outage may next retry up to ~40 s after the IdP is back.
FRESH_WITHIN = 50.0


@dataclass(frozen=True, slots=True)
class Probe:
    """One GET /v1/tokens during the outage."""

    user: str
    sent: float
    received: float
    status: int
    body: dict[str, Any]
    retry_after: str | None


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def check_outage_probes(user: str, seen: list[Probe], last: dict[str, Any], expiry: float) -> None:
    """One grant's GETs during the outage: its last token while it lives, then 503."""
    statuses = [p.status for p in seen]
    assert set(statuses) == {200, 503}, (user, statuses)
    # 200 until the token expires, then 503: never back to 200 while the IdP is down.
    assert statuses == sorted(statuses), (user, statuses)
    served = [p for p in seen if p.status == 200]
    refused = [p for p in seen if p.status == 503]
    # The last known token, and only while it lives (expires_at is cut to the second, so
    # the real expiry lies within a second after it).
    assert {(p.body["access_token"], p.body["expires_at"]) for p in served} == {
        (last["access_token"], last["expires_at"])
    }
    assert all(p.sent < expiry + 1 for p in served), user
    assert {p.body["code"] for p in refused} == {"token_unavailable"}
    assert all(p.retry_after is not None and int(p.retry_after) >= 1 for p in refused), user
    assert all(p.received >= expiry for p in refused), user
    # Served right up to the expiry, refused right after it.
    assert served[-1].sent >= expiry - 1 - POLL
    assert refused[0].received <= expiry + 2 + POLL


async def test_an_outage_longer_than_token_life_serves_until_expiry_then_503_and_drains_gently(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """During a 20 s outage with 10 s tokens each grant is served its last token until it
    really expires, then 503 token_unavailable with Retry-After, and keeps its refresh token;
    after the restart every grant is fresh again within a bounded time, with at most
    max_concurrency refreshes in flight."""
    accounts = users(GRANTS)
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=LIFETIME, users=accounts
    )
    userinfo = UserInfo(idp)
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("outage", refresh=SETTINGS)
        broker.start()
        await broker.log_in_all(accounts)
        await asyncio.sleep(LIFETIME / 2)  # every grant has been refreshed on schedule once

        # Stop the IdP between refreshes: one cut mid-call would be ambiguous and, without
        # grace, rightly cost its grant (that is the crash tests' subject, not this one's).
        idle = IdpConnectionSampler(broker.pid, idp.port)
        for _ in range(1000):
            if idle.count() == 0:
                break
            await asyncio.sleep(0.005)
        idp.stop()
        stopped = time.time()
        await asyncio.sleep(0.2)
        last = {u: (await broker.token(u)).json() for u in accounts}
        known = await broker.grants()

        probes: list[Probe] = []
        listings: list[dict[str, dict[str, Any]]] = []
        while time.time() < stopped + OUTAGE:
            for user in accounts:
                sent = time.time()
                reply = await broker.token(user)
                probes.append(
                    Probe(
                        user,
                        sent,
                        time.time(),
                        reply.status,
                        reply.json(),
                        reply.headers.get("Retry-After"),
                    )
                )
            listings.append(await broker.grants())
            await asyncio.sleep(POLL)

        idp.restart()
        restarted = time.time()
        idp.faults(token_delay=DRAIN_DELAY, count=10_000)
        fresh_at: dict[str, float] = {}
        alive: dict[str, int] = {}  # userinfo's answer to each fresh token, checked at once
        with IdpConnectionSampler(broker.pid, idp.port) as drain:
            while len(fresh_at) < GRANTS and time.time() < restarted + FRESH_WITHIN:
                for user in accounts:
                    if user in fresh_at:
                        continue
                    reply = await broker.token(user)
                    body = reply.json()
                    if reply.status == 200 and body["expires_at"] > last[user]["expires_at"]:
                        fresh_at[user] = time.time() - restarted
                        alive[user] = await userinfo.status(body["access_token"])
                await asyncio.sleep(POLL)
        drain_calls = [c for c in refresh_calls(broker.events("refresh")) if c.start >= restarted]

        # A herd on purpose: every grant refreshed at once by an admin.
        herd_started = time.time()
        with IdpConnectionSampler(broker.pid, idp.port) as herd:
            refreshed = await asyncio.gather(*(broker.refresh(u) for u in accounts))
        herd_calls = [c for c in refresh_calls(broker.events("refresh")) if c.start >= herd_started]
        idp.faults(clear=True)
        final = await broker.grants()
        stats = idp.stats()  # counted since the restart
    await userinfo.close()

    outage_calls = [
        c for c in refresh_calls(broker.events("refresh")) if stopped <= c.start < restarted
    ]
    by_user: dict[str, list[Probe]] = defaultdict(list)
    for probe in probes:
        by_user[probe.user].append(probe)
    served_last = {u: max(p.sent for p in ps if p.status == 200) for u, ps in by_user.items()}
    first_refused = {
        u: min((p.received for p in ps if p.status == 503), default=0.0)
        for u, ps in by_user.items()
    }
    expiry = {u: epoch(last[u]["expires_at"]) for u in accounts}
    retry_afters = sorted({int(p.retry_after or 0) for p in probes if p.status == 503})
    report(
        "outage",
        {
            "grants": GRANTS,
            "outage_s": OUTAGE,
            "probes": len(probes),
            "served_200": sum(p.status == 200 for p in probes),
            "refused_503": sum(p.status == 503 for p in probes),
            "served_until_s_before_expiry_max": round(
                max(expiry[u] - served_last[u] for u in accounts), 2
            ),
            "refused_s_after_expiry_max": round(
                max(first_refused[u] - expiry[u] for u in accounts), 2
            ),
            "retry_after_values": retry_afters,
            "refresh_attempts_during_outage": len(outage_calls),
            "attempt_outcomes": sorted({c.outcome for c in outage_calls}),
            "fresh_after_restart_s_max": round(max(fresh_at.values(), default=-1), 1),
            "fresh_after_restart_s": sorted(round(v, 1) for v in fresh_at.values()),
            "drain_max_in_flight_sampled": drain.maximum,
            "drain_max_in_flight_logged": max_overlap((c.start, c.end) for c in drain_calls),
            "drain_samples": drain.samples,
            "herd_max_in_flight_sampled": herd.maximum,
            "herd_max_in_flight_logged": max_overlap((c.start, c.end) for c in herd_calls),
            "herd_histogram": dict(sorted(herd.histogram.items())),
            "idp_since_restart": stats_delta({}, stats),
        },
    )

    # The snapshot taken during the outage is what each grant had when the IdP went away.
    assert {u: g["access_expires_at"] for u, g in known.items()} == {
        u: last[u]["expires_at"] for u in accounts
    }
    assert all(c.outcome == "transient_error" for c in outage_calls), outage_calls[:3]
    for user, seen in by_user.items():
        check_outage_probes(user, seen, last[user], expiry[user])
    # No refresh token was deleted; nothing gave up on a grant.
    for listing in listings:
        states = {u: (g["state"], g["has_refresh_token"]) for u, g in listing.items()}
        assert states == dict.fromkeys(accounts, ("active", True))
    # Fresh again, gently.
    assert sorted(fresh_at) == sorted(accounts)
    assert alive == dict.fromkeys(accounts, 200)
    assert drain.maximum <= MAX_CONCURRENCY
    assert max_overlap((c.start, c.end) for c in drain_calls) <= MAX_CONCURRENCY
    assert [r.status for r in refreshed] == [200] * GRANTS
    assert herd.maximum == MAX_CONCURRENCY  # reached, so the sampler sees what it measures
    assert max_overlap((c.start, c.end) for c in herd_calls) <= MAX_CONCURRENCY
    assert {u: g["state"] for u, g in final.items()} == dict.fromkeys(accounts, "active")
    assert stats["spent_refresh_presented"] == 0
    assert stats["reuse_family_revocations"] == 0
    assert stats["refresh_failed"] == {}
