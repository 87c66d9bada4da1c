"""Crash tests of the refresher against the real django-oauth-toolkit IdP (tests/idp).

A real `token-broker serve` keeps grants with 5-second access tokens fresh, so refreshes never
stop, and is killed with SIGKILL at random moments (a seeded RNG: ROTATION_CRASH_SEED overrides
the default, and every test reports the seed it used), then restarted on the same store and
keyring. The IdP holds every token response back (/test/faults token_delay) *after* it has
rotated, which widens the window where the IdP has rotated but the broker has not committed,
so many kills land in it.

A kill that lands after the broker wrote its intent record shows in the next incarnation's log
as "recovering_refreshes" (grants=N) and one "refresh_outcome_unknown" per grant; a recovery
that succeeds is a later "refresh" event with outcome success for that grant, one that cannot
is "rotation_lost".

The two runs of thirty kills take a minute or more each: `make faults` runs them with the fault
matrix (CI runs both after `make test`); `make test` runs the single crash mid-rotation.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.rotation import IN_FLIGHT
from broker.tasks import Tasks
from tests.idp import fixture as idp_fixture
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory
from tests.rotation_harness import (
    REGISTERED_REDIRECT,
    BrokerProcess,
    RefreshSettings,
    UserInfo,
    installation,
    log_events,
    report,
    stats_delta,
    users,
)

django_idp_factory = idp_fixture.django_idp_factory

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("ROTATION_CRASH_SEED", "20261121"))
KILLS = 30
LIFETIME = 5
GRANTS = 8
TOKEN_DELAY = 0.5  # seconds the IdP holds each token response after rotating
KILL_AFTER = (0.2, 2.0)  # seconds after the broker answers /healthz
SETTINGS = RefreshSettings(lifetime_fraction=0.5, min_margin="1s", jitter=0.1, max_concurrency=8)
SETTLE_TIMEOUT = 15.0


@dataclass
class CrashRun:
    """What happened over all kills."""

    seed: int
    delays: list[float] = field(default_factory=list)
    relogins: int = 0

    def numbers(self, broker: BrokerProcess) -> dict[str, Any]:
        """Counted from every incarnation's log."""
        mid_refresh = unknown = recovered = lost = interrupted = 0
        for daemon in broker.incarnations[1:]:
            events = log_events(daemon.log())
            if any(e["event"] == "recovering_refreshes" for e in events):
                mid_refresh += 1
            pending: set[str] = set()
            for event in events:
                if event["event"] == "refresh_outcome_unknown":
                    # Once per grant while it is unresolved: a recovery the provider answered
                    # "not rotated yet" keeps the intent and logs this again when it asks
                    # again (refresh_outcome_pending), still the same unknown outcome.
                    if event["grant"] not in pending:
                        unknown += 1
                    pending.add(event["grant"])
                elif event["event"] == "rotation_lost":
                    lost += 1
                    pending.discard(event["grant"])
                elif (
                    event["event"] == "refresh"
                    and event["outcome"] == "success"
                    and event["grant"] in pending
                ):
                    recovered += 1
                    pending.discard(event["grant"])
            interrupted += len(pending)  # killed again before the recovery finished
        return {
            "seed": self.seed,
            "kills": len(self.delays),
            "kill_delay_s_min": round(min(self.delays), 2),
            "kill_delay_s_max": round(max(self.delays), 2),
            "kills_mid_refresh": mid_refresh,
            "refresh_outcome_unknown": unknown,
            "recovered": recovered,
            "rotation_lost": lost,
            "recovery_interrupted_by_next_kill": interrupted,
            "relogins": self.relogins,
        }


async def settle(broker: BrokerProcess) -> None:
    """Wait until the current incarnation has resolved every refresh it started with open.

    A grant the provider still calls active while a request that carried its token may be on
    its way ("refresh_outcome_pending": the kill landed before the IdP rotated) is asked again
    only once no such request can be (IN_FLIGHT after its last send), so its wait is longer."""
    started = time.monotonic()
    deadline = started + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        events = log_events(broker.process.log())
        if any(e["event"] == "refresh_outcome_pending" for e in events):
            deadline = max(deadline, started + IN_FLIGHT.total_seconds() + SETTLE_TIMEOUT)
        pending = sum(e.get("grants", 0) for e in events if e["event"] == "recovering_refreshes")
        resolved = {
            e["grant"]
            for e in events
            if e["event"] == "rotation_lost"
            or (e["event"] == "refresh" and e.get("outcome") == "success")
        }
        unknown = {e["grant"] for e in events if e["event"] == "refresh_outcome_unknown"}
        lost = {e["grant"] for e in events if e["event"] == "rotation_lost"}
        if len(unknown) >= pending and unknown <= resolved:
            # A loss is logged before it is stored: wait for the listing to show it.
            listed = await broker.grants()
            if all(listed[g.rsplit("/", 1)[1]]["state"] != "active" for g in lost):
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"recovery did not settle:\n{broker.process.log_tail()}")


async def crash_loop(
    broker: BrokerProcess, accounts: dict[str, str], *, relogin: bool, seed: int
) -> CrashRun:
    """KILLS times: let the broker run a random while, SIGKILL it, start it again."""
    rng = random.Random(seed)
    run = CrashRun(seed)
    for kill in range(KILLS):
        if relogin and kill > 0:
            # Keep refresh traffic up: log in again whoever the last crash cost their grant
            # (not after the final one, whose losses the test inspects).
            await settle(broker)
            for user, grant in (await broker.grants()).items():
                if grant["state"] != "active":
                    await broker.log_in(user, accounts[user])
                    run.relogins += 1
        delay = rng.uniform(*KILL_AFTER)
        run.delays.append(delay)
        await asyncio.sleep(delay)
        broker.kill()
        broker.start()
    return run


async def final_check(
    broker: BrokerProcess, idp: DjangoIdP, userinfo: UserInfo
) -> dict[str, tuple[str, str | None, int | None, int | None]]:
    """Each grant: state, last_error, and for active ones the status of an admin refresh and
    the userinfo status of the token served after it."""
    result: dict[str, tuple[str, str | None, int | None, int | None]] = {}
    for user, grant in (await broker.grants()).items():
        if grant["state"] != "active":
            result[user] = (grant["state"], grant["last_error"], None, None)
            continue
        refreshed = await broker.refresh(user)
        body = refreshed.json()
        ok = (
            refreshed.status == 200
            and body["state"] == "active"
            and body["generation"] > grant["generation"]
            and body["last_error"] is None
        )
        token = await broker.token(user)
        status = await userinfo.status(token.json()["access_token"]) if token.status == 200 else 0
        result[user] = ("active", body.get("last_error"), 200 if ok else refreshed.status, status)
    return result


@pytest.mark.faults
async def test_with_refresh_grace_no_grant_is_lost_across_thirty_kills_mid_rotation(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """With a 30 s refresh_grace at the IdP and in the config, 30 SIGKILLs during constant
    refreshes lose no grant: every one is active and refreshable at the end, and the IdP's
    reuse detection never fires."""
    accounts = users(GRANTS)
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT],
        access_token_lifetime=LIFETIME,
        refresh_grace=30,
        users=accounts,
    )
    userinfo = UserInfo(idp)
    started = time.monotonic()
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("grace", refresh=SETTINGS, refresh_grace="30s")
        broker.start()
        await broker.log_in_all(accounts)
        before = idp.stats()
        idp.faults(token_delay=TOKEN_DELAY, count=100_000)
        run = await crash_loop(broker, accounts, relogin=False, seed=SEED)
        idp.faults(clear=True)
        await settle(broker)
        end = await final_check(broker, idp, userinfo)
        metrics = await broker.metrics()
        after = idp.stats()
    await userinfo.close()

    delta = stats_delta(before, after)
    numbers = run.numbers(broker)
    recovered_metric = metrics.get(
        (
            "token_broker_rotation_recoveries_total",
            (("outcome", "recovered"), ("provider", "techniek")),
        ),
        0.0,
    )
    report(
        "crash_grace",
        {
            **numbers,
            "last_incarnation_recovered_metric": recovered_metric,
            "grants_usable_at_end": sum(1 for v in end.values() if v[2:] == (200, 200)),
            "seconds": round(time.monotonic() - started),
            "idp": delta,
            "idp_refresh_failed": after["refresh_failed"],
        },
    )
    assert numbers["kills"] == KILLS
    assert numbers["kills_mid_refresh"] > 0, "no kill landed mid-refresh: the test proved nothing"
    assert numbers["rotation_lost"] == 0
    assert (
        numbers["recovered"] + numbers["recovery_interrupted_by_next_kill"]
        == numbers["refresh_outcome_unknown"]
    )
    assert end == dict.fromkeys(accounts, ("active", None, 200, 200))
    assert delta["reuse_family_revocations"] == 0
    # Every spent token the IdP saw was a deliberate replay that it accepted inside grace.
    assert delta["spent_refresh_presented"] == delta["in_grace_replays"]
    assert after["refresh_failed"] == before["refresh_failed"]


@pytest.mark.faults
async def test_without_grace_every_grant_is_usable_or_marked_rotation_lost_across_thirty_kills(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """With no refresh_grace, 30 SIGKILLs during constant refreshes leave every grant either
    usable (an admin refresh succeeds) or reauth_required with rotation_lost, never silently
    broken, and no spent refresh token ever reaches the IdP."""
    accounts = users(GRANTS)
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=LIFETIME, users=accounts
    )
    userinfo = UserInfo(idp)
    started = time.monotonic()
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("nograce", refresh=SETTINGS)
        broker.start()
        await broker.log_in_all(accounts)
        before = idp.stats()
        idp.faults(token_delay=TOKEN_DELAY, count=100_000)
        run = await crash_loop(broker, accounts, relogin=True, seed=SEED + 1)
        await settle(broker)
        idp.faults(clear=True)
        end = await final_check(broker, idp, userinfo)
        after = idp.stats()
    await userinfo.close()

    delta = stats_delta(before, after)
    numbers = run.numbers(broker)
    lost_at_end = sorted(u for u, v in end.items() if v[0] != "active")
    report(
        "crash_no_grace",
        {
            **numbers,
            "lost_at_end": len(lost_at_end),
            "grants_usable_at_end": sum(1 for v in end.values() if v[2:] == (200, 200)),
            "seconds": round(time.monotonic() - started),
            "idp": delta,
            "idp_refresh_failed": after["refresh_failed"],
        },
    )
    assert numbers["kills"] == KILLS
    assert numbers["kills_mid_refresh"] > 0, "no kill landed mid-refresh: the test proved nothing"
    # Each unknown outcome ends lost, or recovered when the provider says the token never
    # rotated (introspection), or is cut short by the next kill.
    assert (
        numbers["rotation_lost"]
        + numbers["recovered"]
        + numbers["recovery_interrupted_by_next_kill"]
        == numbers["refresh_outcome_unknown"]
    )
    for user, (state, last_error, refreshed, userinfo_status) in end.items():
        if state == "active":
            assert (refreshed, userinfo_status) == (200, 200), (user, end[user])
        else:
            assert state == "reauth_required", (user, end[user])
            assert (last_error or "").startswith("rotation_lost"), (user, end[user])
    assert delta["spent_refresh_presented"] == 0
    assert delta["reuse_family_revocations"] == 0
    assert after["refresh_failed"] == before["refresh_failed"]


async def test_after_a_crash_mid_rotation_no_grant_serves_its_rotated_token_before_recovery(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """After a kill that leaves two grants rotated at the IdP but not committed, the restarted
    broker (max_concurrency 1, grace 30 s) serves each grant a token the IdP accepts."""
    accounts = users(2)
    idp = django_idp_factory(redirect_uris=[REGISTERED_REDIRECT], refresh_grace=30, users=accounts)
    userinfo = UserInfo(idp)
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("recover", refresh=SETTINGS, refresh_grace="30s")
        broker.start()
        await broker.log_in_all(accounts)
        old = {u: (await broker.token(u)).json()["access_token"] for u in accounts}
        before = idp.stats()["refresh_ok"]
        idp.faults(token_delay=5.0, count=2)  # both rotate at once; answers come 5 s later
        tasks = Tasks()
        refreshes = [tasks.spawn(broker.refresh(u), f"refresh {u}") for u in accounts]
        for _ in range(200):
            if idp.stats()["refresh_ok"] >= before + 2:
                break
            await asyncio.sleep(0.02)
        old_status = {u: await userinfo.status(t) for u, t in old.items()}
        broker.kill()
        await asyncio.gather(*refreshes, return_exceptions=True)
        await broker.close()
        # One recovery at a time, and the IdP holds the first replay's answer back.
        broker.configure(
            inst,
            refresh=RefreshSettings(
                lifetime_fraction=0.5, min_margin="1s", jitter=0.1, max_concurrency=1
            ),
            refresh_grace="30s",
            redirect_uri=broker.redirect_uri,
        )
        idp.faults(token_delay=3.0, count=1)
        broker.start()
        replies = await asyncio.gather(*(broker.token(u) for u in accounts))
        served = {u: r.json()["access_token"] for u, r in zip(accounts, replies, strict=True)}
        served_status = {u: await userinfo.status(t) for u, t in served.items()}
        await settle(broker)
    await userinfo.close()
    report(
        "restart_serves_rotated_token",
        {
            "old_tokens_dead_before_kill": old_status,
            "served_is_old": {u: served[u] == old[u] for u in accounts},
            "served_status": served_status,
        },
    )
    assert old_status == dict.fromkeys(accounts, 401)
    assert served_status == dict.fromkeys(accounts, 200)
