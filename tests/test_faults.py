"""The fault matrix: one fault around one real refresh, for every fault, grace and store.

Each lab is one real `token-broker serve` (under a fake wall clock, tests/fakeclock.py) with a
real django-oauth-toolkit IdP (reuse protection on, its refresh grace 0 s or 30 s, the broker's
`refresh_grace` set to match, introspection of refresh tokens offered to the client) behind the
fault proxy (tests/faultproxy.py, every IdP request of the broker goes through it), on SQLite or
on a PostgreSQL cluster of the test's own. Every cell takes a freshly logged-in grant of its own,
injects one fault into one admin-triggered refresh, and checks from outside the broker:

- the end state: `new` (active at the next generation), `kept` (active at the same generation,
  its refresh token unspent: a follow-up refresh then rotates it), or `lost` (reauth_required
  with reason rotation_lost) — which is allowed only where the provider really rotated and
  neither grace nor introspection can recover the new pair;
- no reuse detection at the IdP (its reuse protection would revoke the whole family);
- no HTTP 500 on the token path, for the cell's grant and for a bystander grant, fetched every
  25 ms throughout;
- every token served is accepted by the IdP's userinfo endpoint when checked the moment it is
  received, unless a refresh reached the provider between the sending of the request that got
  it and the end of the check (the provider deletes the old access token when it rotates; the
  broker's promise is that it never serves one that is already dead, and stops serving it once
  its refresh is under way). A token is checked when first served, and again when served for
  a request sent after a refresh reached the provider since its last check: an old access
  token served once its refresh is under way is caught.

`make faults` runs the matrix and prints it as a table (tests/conftest.py collects the rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.crypto import load_keyring
from broker.model import Grant, GrantState
from broker.store.engine import create_engine
from broker.store.repository import GrantRepository
from broker.tasks import Tasks
from tests import conftest
from tests.fakeclock import FakeClock, find_libfaketime
from tests.faultproxy import Fault, FaultProxy, Route
from tests.idp import fixture as idp_fixture
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory
from tests.postgres import PostgresServer, PrivatePostgres, find_pg_bin, start_postgres
from tests.rotation_harness import (
    PROVIDER,
    REGISTERED_REDIRECT,
    BrokerProcess,
    Installation,
    RefreshSettings,
    UserInfo,
    installation,
    stats_delta,
    users,
)
from tests.storefaults import SqliteWriteLock

django_idp_factory = idp_fixture.django_idp_factory

pytestmark = [pytest.mark.slow, pytest.mark.faults]

KEPT, NEW, LOST = "kept", "new", "lost"
# The back-off after a refused refresh runs out while its settle waits for the store: the
# grant is kept, and due again as soon as the settle lands, so it may rotate before it is read.
KEPT_THEN_DUE = f"{KEPT} or {NEW}"
GRACES = (0, 30)
# Long tokens: no refresh happens in a cell but the one the cell triggers.
SETTINGS = RefreshSettings(lifetime_fraction=0.75, min_margin="60s", jitter=0.0, max_concurrency=8)
CLIENT_PAUSE = 0.025
SETTLE_SECONDS = 120.0  # a recovery may wait out IN_FLIGHT (35 s) after its grace
SQLITE_BUSY = 10.0  # the broker's busy timeout (broker.store.engine.BUSY_TIMEOUT_MS)
OUTAGE = 20.0  # seconds the database is stopped in the outage cells


@dataclass
class Row:
    """One cell of the matrix, as measured."""

    fault: str
    store: str
    grace: int
    expected: str
    end_state: str
    reuse_detections: int
    http_500: int
    served: int
    rejected: int
    seconds: float

    @property
    def ok(self) -> bool:
        """Whether the cell ended as it must."""
        return (
            self.end_state in self.expected.split(" or ")
            and self.reuse_detections == 0
            and self.http_500 == 0
            and self.rejected == 0
        )


@dataclass
class Traffic:
    """What the client loops saw during one cell."""

    statuses: list[int] = field(default_factory=list)
    checked: dict[str, float] = field(default_factory=dict)  # every token served -> last check
    rejected: int = 0  # checks that failed with no refresh reaching the provider to excuse them


class Lab:
    """One broker, IdP, proxy and store; the cells run in it one after another."""

    def __init__(
        self,
        name: str,
        grace: int,
        *,
        proxy: FaultProxy,
        idp: DjangoIdP,
        inst: Installation,
        clock: FakeClock,
        pg: PrivatePostgres | None,
    ) -> None:
        self.name, self.grace = name, grace
        self.proxy, self.idp, self.inst, self.clock, self.pg = proxy, idp, inst, clock, pg
        self.userinfo = UserInfo(idp)
        self.broker: BrokerProcess = inst.broker(
            f"{name}-{grace}", refresh=SETTINGS, refresh_grace=f"{grace}s"
        )
        self.accounts = users(40)
        self.free = [u for u in self.accounts if u != "u00"]  # u00 is the bystander
        self.rows: list[Row] = []
        self.arrivals: list[float] = []

    async def start(self) -> None:
        """Start the broker and log every account in."""
        await asyncio.to_thread(self.broker.start, self.clock.env())
        await self.broker.log_in_all(self.accounts)

    async def restart_broker(self) -> None:
        """A new incarnation: nothing of the provider's metadata or keys in memory."""
        await asyncio.to_thread(self.broker.stop)
        await asyncio.to_thread(self.broker.start, self.clock.env())

    # -- reading the outcome ----------------------------------------------------------------

    async def stored(self, user: str) -> Grant:
        """The grant as the store holds it (read with the keyring, as a test's inspection)."""
        engine = create_engine(self.inst.store_url)
        try:
            repo = GrantRepository(engine, load_keyring(self.inst.key_file))
            grant = await repo.get(PROVIDER, user)
        finally:
            await engine.dispose()
        assert grant is not None
        return grant

    async def settled(self, user: str) -> Grant:
        """The grant once its refresh is over (no intent left), retried while the store is
        down."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            with contextlib.suppress(Exception):
                grant = await self.stored(user)
                if grant.intent_at is None:
                    return grant
            assert time.monotonic() < deadline, f"{user}: the refresh did not settle"
            await asyncio.sleep(0.2)

    # -- a cell -----------------------------------------------------------------------------

    async def cell(
        self,
        fault: str,
        expected: dict[int, str],
        inject: Callable[[Lab, str], Awaitable[None]],
        store: str,
    ) -> Row:
        """Run one cell on a fresh grant; its row."""
        user = self.free.pop(0)
        before = await self.stored(user)
        stats = self.idp.stats()
        traffic = Traffic()
        self.proxy.disarm()
        started = time.monotonic()
        tasks = Tasks()
        stop = asyncio.Event()
        loops = [
            tasks.spawn(self._client(who, traffic, stop), f"client {who}") for who in (user, "u00")
        ]
        try:
            await inject(self, user)
            after = await self.settled(user)
            end = self._end_state(before, after)
            if end == KEPT:
                # The refresh token is unspent: the next refresh rotates it.
                await self._refresh_until_rotated(user, before.generation + 1)
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
            self.proxy.disarm()
        delta = stats_delta(stats, self.idp.stats())
        row = Row(
            fault=fault,
            store=store,
            grace=self.grace,
            expected=expected[self.grace],
            end_state=end,
            reuse_detections=int(delta.get("reuse_family_revocations", 0)),
            http_500=sum(status == 500 for status in traffic.statuses),
            served=len(traffic.checked),
            rejected=traffic.rejected,
            seconds=round(time.monotonic() - started, 1),
        )
        self.rows.append(row)
        return row

    def _refresh_reached_provider(self, after: float, before: float) -> bool:
        """Whether a token request arrived at the proxy (the broker's way to the provider)
        between two epoch times."""
        return any(after < at < before for at, route in self.proxy.arrivals if route is Route.TOKEN)

    @staticmethod
    def _end_state(before: Grant, after: Grant) -> str:
        if after.state is GrantState.REAUTH_REQUIRED and (after.last_error or "").startswith(
            "rotation_lost"
        ):
            return LOST
        if after.state is not GrantState.ACTIVE:
            return f"{after.state.value}: {after.last_error}"
        if after.generation == before.generation + 1:
            return NEW
        if after.generation == before.generation:
            return KEPT
        return f"generation {before.generation} -> {after.generation}"

    async def _refresh_until_rotated(self, user: str, generation: int) -> None:
        deadline = time.monotonic() + SETTLE_SECONDS
        while (await self.stored(user)).generation < generation:
            assert time.monotonic() < deadline, f"{user}: the kept token never rotated"
            await self.broker.refresh(user)
            await asyncio.sleep(0.5)

    async def _client(self, user: str, traffic: Traffic, stop: asyncio.Event) -> None:
        while not stop.is_set():
            sent = time.time()
            try:
                reply = await self.broker.token(user)
            except Exception:  # noqa: BLE001 - a refused connection is not a 500; it is rare
                await asyncio.sleep(CLIENT_PAUSE)
                continue
            traffic.statuses.append(reply.status)
            if reply.status == 200:
                token = reply.json()["access_token"]
                last = traffic.checked.get(token)
                if last is None or self._refresh_reached_provider(last, sent):
                    traffic.checked[token] = time.time()
                    accepted = await self.userinfo.status(token) == 200
                    if not accepted and not self._refresh_reached_provider(sent, time.time()):
                        traffic.rejected += 1
            await asyncio.sleep(CLIENT_PAUSE)


# -- the faults ------------------------------------------------------------------------------


async def admin_refresh(lab: Lab, user: str) -> None:
    """Refresh the grant now, as an operator would, and wait for the answer (the broker waits
    at most 35 s for a refresh before it answers)."""
    await lab.broker.refresh(user, seconds=60)


def armed(route: Route, fault: Fault, **options: Any) -> Callable[[Lab, str], Awaitable[None]]:
    """Arm one fault on `route`, then refresh."""

    async def inject(lab: Lab, user: str) -> None:
        lab.proxy.arm(route, fault, **options)
        await admin_refresh(lab, user)

    return inject


def after_restart(
    route: Route, fault: Fault, **options: Any
) -> Callable[[Lab, str], Awaitable[None]]:
    """Restart the broker (so it holds no metadata or keys), arm the fault, then refresh."""

    async def inject(lab: Lab, user: str) -> None:
        await lab.restart_broker()
        lab.proxy.arm(route, fault, **options)
        await admin_refresh(lab, user)

    return inject


async def sqlite_locked_at_claim(lab: Lab, user: str) -> None:
    """Another process holds SQLite's write lock past the busy timeout as the refresh starts."""
    async with SqliteWriteLock(lab.inst.db, max_hold=SQLITE_BUSY + 10):
        await admin_refresh(lab, user)


def sqlite_locked_after_answer(status: int | None) -> Callable[[Lab, str], Awaitable[None]]:
    """The provider answers (rotates, or with `status` refuses without acting); before the
    broker hears it, another process takes SQLite's write lock and holds it 14 s: the commit
    (or the settle) waits out the busy timeout, fails, and must be retried until it lands."""

    async def inject(lab: Lab, user: str) -> None:
        hold = lab.proxy.arm(Route.TOKEN, Fault.HOLD, status=status, seconds=60)
        tasks = Tasks()
        refresh = tasks.spawn(admin_refresh(lab, user), "refresh")
        await asyncio.wait_for(hold.arrived.wait(), 30)
        lock = await SqliteWriteLock(lab.inst.db, max_hold=SQLITE_BUSY + 20).acquire()
        try:
            hold.release()
            await asyncio.sleep(SQLITE_BUSY + 4)
        finally:
            lock.release()
        await refresh

    return inject


async def postgres_stopped_at_claim(lab: Lab, user: str) -> None:
    """The database is down as the refresh starts."""
    assert lab.pg is not None
    await asyncio.to_thread(lab.pg.stop)
    try:
        await admin_refresh(lab, user)
    finally:
        await asyncio.to_thread(lab.pg.start)


def postgres_after_answer(
    status: int | None, outage: float | None
) -> Callable[[Lab, str], Awaitable[None]]:
    """The provider answers; before the broker hears it the database is restarted (`outage`
    None) or stopped for `outage` seconds: the commit (or the settle) fails on its pooled
    connection and must be retried until it lands."""

    async def inject(lab: Lab, user: str) -> None:
        assert lab.pg is not None
        hold = lab.proxy.arm(Route.TOKEN, Fault.HOLD, status=status, seconds=90)
        tasks = Tasks()
        refresh = tasks.spawn(admin_refresh(lab, user), "refresh")
        await asyncio.wait_for(hold.arrived.wait(), 30)
        if outage is None:
            await asyncio.to_thread(lab.pg.restart)
            hold.release()
        else:
            await asyncio.to_thread(lab.pg.stop)
            hold.release()
            await asyncio.sleep(outage)
            await asyncio.to_thread(lab.pg.start)
        await refresh

    return inject


def clock_step(seconds: float) -> Callable[[Lab, str], Awaitable[None]]:
    """The broker's wall clock steps by `seconds`; it refreshes on, then steps back."""

    async def inject(lab: Lab, user: str) -> None:
        lab.clock.set_offset(seconds)
        try:
            await asyncio.sleep(1)
            await admin_refresh(lab, user)
        finally:
            lab.clock.set_offset(0)

    return inject


Inject = Callable[[Lab, str], Awaitable[None]]
BOTH: tuple[str, ...] = ("sqlite", "postgresql")


@dataclass(frozen=True)
class Cell:
    """One fault of the matrix: how to inject it, where, and how it must end per grace."""

    fault: str
    without_grace: str
    with_grace: str
    inject: Inject
    stores: tuple[str, ...] = BOTH

    def expected(self) -> dict[int, str]:
        """The end state it must have, by the provider's grace."""
        return {0: self.without_grace, 30: self.with_grace}


def status(code: int, **options: Any) -> Inject:
    """A status answered by a proxy in front of the token endpoint."""
    return armed(Route.TOKEN, Fault.STATUS, status=code, **options)


CELLS: list[Cell] = [
    Cell("token: connection refused", KEPT, KEPT, armed(Route.ANY, Fault.REFUSE, seconds=1.0)),
    Cell("token: reset before the provider", KEPT, NEW, armed(Route.TOKEN, Fault.RESET_BEFORE)),
    Cell(
        "token: reset after the provider rotated", LOST, NEW, armed(Route.TOKEN, Fault.RESET_AFTER)
    ),
    Cell("token: 429 Retry-After", KEPT, KEPT, status(429, retry_after=1)),
    Cell("token: 503 Retry-After", KEPT, KEPT, status(503, retry_after=1)),
    Cell("token: 500 from a proxy", KEPT, NEW, status(500)),
    Cell("token: 502 from a proxy", KEPT, NEW, status(502)),
    Cell("token: 504 from a proxy", KEPT, NEW, status(504)),
    Cell("token: 502 after the provider rotated", LOST, NEW, status(502, forward=True)),
    Cell(
        "token: answer past the client timeout",
        LOST,
        NEW,
        armed(Route.TOKEN, Fault.DELAY, seconds=25),
    ),
    Cell("token: garbled 200", LOST, NEW, armed(Route.TOKEN, Fault.GARBLE)),
    # aiohttp sends a GET again once after a reset; both resets fail the fetch.
    Cell(
        "discovery: reset", KEPT, KEPT, after_restart(Route.DISCOVERY, Fault.RESET_BEFORE, count=2)
    ),
    Cell("discovery: timeout", KEPT, KEPT, after_restart(Route.DISCOVERY, Fault.DELAY, seconds=25)),
    Cell("discovery: 503", KEPT, KEPT, after_restart(Route.DISCOVERY, Fault.STATUS, status=503)),
    Cell("jwks: reset", KEPT, KEPT, after_restart(Route.JWKS, Fault.RESET_BEFORE, count=2)),
    Cell("jwks: 503", KEPT, KEPT, after_restart(Route.JWKS, Fault.STATUS, status=503)),
    Cell("store: locked at the claim", KEPT, KEPT, sqlite_locked_at_claim, ("sqlite",)),
    Cell("store: locked at the commit", NEW, NEW, sqlite_locked_after_answer(None), ("sqlite",)),
    Cell(
        "store: locked at the settle (503)",
        KEPT_THEN_DUE,
        KEPT_THEN_DUE,
        sqlite_locked_after_answer(503),
        ("sqlite",),
    ),
    Cell("store: down at the claim", KEPT, KEPT, postgres_stopped_at_claim, ("postgresql",)),
    Cell(
        "store: restarted at the commit",
        NEW,
        NEW,
        postgres_after_answer(None, None),
        ("postgresql",),
    ),
    Cell(
        "store: down 20 s at the commit",
        NEW,
        NEW,
        postgres_after_answer(None, OUTAGE),
        ("postgresql",),
    ),
    Cell(
        "store: down 20 s at the settle (503)",
        KEPT_THEN_DUE,
        KEPT_THEN_DUE,
        postgres_after_answer(503, OUTAGE),
        ("postgresql",),
    ),
    Cell("clock: 10 min back", NEW, NEW, clock_step(-600)),
    Cell("clock: 10 min forward", NEW, NEW, clock_step(600)),
]


@contextlib.asynccontextmanager
async def lab(
    name: str,
    grace: int,
    idp_factory: DjangoIdPFactory,
    log_dir: Path,
    root: Path,
) -> AsyncIterator[Lab]:
    """A lab for one store and grace: proxy, IdP, store, a broker under a fake clock."""
    proxy = await FaultProxy().start()
    pg: PrivatePostgres | None = None
    server: PostgresServer | None = None
    try:
        idp = await asyncio.to_thread(
            idp_factory,
            redirect_uris=[REGISTERED_REDIRECT],
            refresh_grace=grace,
            users=users(40),
            issuer=f"{proxy.url}/o",
        )
        proxy.upstream = idp.url
        store_url = None
        if name == "postgresql":
            server = await asyncio.to_thread(start_postgres, root)
            pg = PrivatePostgres(server)
            store_url = pg.new_database()
        clock = FakeClock(Path(tempfile.mkdtemp(prefix="clock-", dir=root)))
        async with installation(idp, log_dir, store_url) as inst:
            the_lab = Lab(name, grace, proxy=proxy, idp=idp, inst=inst, clock=clock, pg=pg)
            await the_lab.start()
            yield the_lab
            await the_lab.userinfo.close()
    finally:
        await proxy.stop()
        if server is not None:
            await asyncio.to_thread(server.stop)


async def run_matrix(the_lab: Lab) -> list[Row]:
    """Every cell of the lab's store, one after another."""
    for cell in CELLS:
        if the_lab.name in cell.stores:
            await the_lab.cell(cell.fault, cell.expected(), cell.inject, the_lab.name)
    return the_lab.rows


@pytest.mark.parametrize("store", BOTH)
async def test_no_fault_costs_a_login_unless_the_provider_rotated_and_nothing_can_recover_it(
    store: str, tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """Every fault of the matrix, without grace and with 30 s of it, ends as the table says:
    a kept or new grant everywhere but where the provider rotated and neither grace nor
    introspection can recover the pair; never a reuse detection, never a 500, never a served
    token the provider had already deleted (ROTATION.md invariants 4, 5, 7, 9)."""
    if store == "postgresql" and find_pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    if find_libfaketime() is None:
        pytest.skip("libfaketime not found: apt-get install faketime")
    async with (
        lab(store, 0, django_idp_factory, log_dir, tmp_path) as without_grace,
        lab(store, 30, django_idp_factory, log_dir, tmp_path) as with_grace,
    ):
        results = await asyncio.gather(run_matrix(without_grace), run_matrix(with_grace))
    rows = [row for rows in results for row in rows]
    conftest.FAULT_MATRIX.extend(rows)
    failed = [row for row in rows if not row.ok]
    assert not failed, failed
