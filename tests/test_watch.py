"""Tests for broker.api.watch: ETags, If-None-Match and requests held with `wait`.

The app is the daemon's (`build_app`) over a real GrantService, GrantCache and SQLite store,
served the daemon's way (`start_runner`) on a real Unix socket; changes reach held requests
through the cache's publish, as a committed refresh's do. The suite runs as root, so the
caller is admin (`uid:0`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.api.app import build_app
from broker.api.context import WATCHES
from broker.api.identity import Policy
from broker.api.server import start_runner
from broker.api.sockets import BACKLOG, bind_unix
from broker.api.watch import Watches, etag, matches
from broker.cache import GrantCache
from broker.crypto import Keyring, write_keyring
from broker.grants import GrantService, Import
from broker.login import LoginService
from broker.metrics import Metrics
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.engine import create_engine
from broker.store.logins import LoginRepository
from broker.store.migrate import upgrade
from broker.store.repository import GrantRepository
from broker.tasks import Tasks
from tests.test_api import START, Clock, Reply, _config, assert_problem
from tests.test_openapi import Contract, assert_conforms, load_document

TOKEN = "/v1/tokens/{provider}/{user}"
ALICE = "/v1/tokens/techniek/alice"
ME = f"uid:{os.getuid()}"
QUICK = 5.0  # seconds a test waits for something that should take milliseconds


@dataclass
class Served:
    """The API with its cache, service and app in reach of the test."""

    app: web.Application
    cache: GrantCache
    service: GrantService
    repository: GrantRepository
    clock: Clock
    metrics: Metrics
    socket: Path
    stack: contextlib.AsyncExitStack

    @property
    def watches(self) -> Watches:
        """The app's held-request table."""
        return self.app[WATCHES]

    def session(self) -> aiohttp.ClientSession:
        """A new client session on the socket (one connection per request in flight)."""
        connector = aiohttp.UnixConnector(path=str(self.socket), limit=0)
        return aiohttp.ClientSession(connector=connector)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        """One GET on its own connection."""
        url = "http://broker" + path
        async with self.session() as session, session.get(url, headers=headers) as r:
            return Reply(r.status, r.headers, await r.text())

    async def store(self, user: str, access: str, *, force: bool = False) -> Grant:
        """Import (or with force replace) a grant's tokens, published as a commit is."""
        await self.service.import_grant(
            Import(
                provider="techniek",
                user=user,
                refresh_token=Secret(f"rt-{access}"),
                access_token=Secret(access),
                expires_in=3600,
                force=force,
            ),
            self.clock(),
        )
        grant = self.cache.get("techniek", user)
        assert grant is not None
        return grant

    async def wait_held(self, count: int, caller: str = ME) -> None:
        """Until `caller` holds `count` requests (bounded)."""
        deadline = time.monotonic() + QUICK
        while self.watches.held_by(caller) != count:
            assert time.monotonic() < deadline, f"{self.watches.held_by(caller)} held, not {count}"
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def served(root: Path, *, held_per_caller: int = 1000) -> AsyncIterator[Served]:
    """The daemon's app over a migrated SQLite store and a cache the test can see."""
    config = _config(root)
    keyring = Keyring.generate(START)
    write_keyring(config.store.key_file, keyring, replace=False)
    clock = Clock(START)
    engine = create_engine(config.store.url)
    await upgrade(engine)
    repository = GrantRepository(engine, keyring)
    cache = GrantCache()
    service = GrantService(repository, config.providers, cache=cache, clock=clock)
    metrics = Metrics(config.providers)

    async def ready() -> list[str]:
        return []

    app = build_app(
        service=service,
        logins=LoginService(LoginRepository(engine, repository.sealer), service, {}),
        metrics=metrics,
        policy=Policy(config.clients, os.getuid()),
        clock=clock,
        readiness=ready,
        held_per_caller=held_per_caller,
    )
    listener = bind_unix(config.server.socket, 0o600)
    try:
        async with contextlib.AsyncExitStack() as stack:
            runner = await start_runner(stack, app)
            await web.SockSite(runner, listener.sock, backlog=BACKLOG).start()
            yield Served(app, cache, service, repository, clock, metrics, listener.path, stack)
    finally:
        listener.remove()
        await engine.dispose()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Served]:
    """The API with an empty store."""
    async with served(tmp_path) as s:
        yield s


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# -- the tag and its comparison (pure) --------------------------------------------------------


def _grant(**changes: object) -> Grant:
    base = Grant(
        id="0123456789abcdef0123456789abcdef",
        provider="techniek",
        user="alice",
        state=GrantState.ACTIVE,
        generation=3,
        tokens=TokenSet(access_token=Secret("at-not-in-any-tag")),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_tag_names_row_and_generation_and_never_the_token() -> None:
    """The ETag changes with the generation and the row, not with a same-generation rewrite,
    and carries nothing of the token."""
    grant = _grant()
    assert etag(grant) == '"0123456789abcdef.3"'
    assert etag(dataclasses.replace(grant, version=99)) == etag(grant)
    assert etag(dataclasses.replace(grant, generation=4)) != etag(grant)
    assert etag(dataclasses.replace(grant, id="fedcba9876543210" * 2)) != etag(grant)
    assert "at-not" not in etag(grant)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ('"0123456789abcdef.3"', True),
        ('W/"0123456789abcdef.3"', True),
        ('"x.1", "0123456789abcdef.3"', True),
        ("*", True),
        (" * ", True),
        ('"0123456789abcdef.2"', False),
        ("0123456789abcdef.3", False),
        ("", False),
        ('"0123456789abcdef.3', False),
    ],
)
def test_if_none_match_uses_weak_comparison(condition: str, expected: bool) -> None:
    """If-None-Match matches the tag itself, its W/ form, a list holding it, or *."""
    assert matches(condition, '"0123456789abcdef.3"') is expected


# -- ETag and If-None-Match on the token route ----------------------------------------------------


async def test_every_200_has_an_etag_that_moves_exactly_with_the_served_token(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """The ETag is the same across requests for one token, changes when new tokens are
    stored over the grant, and differs between grants."""
    await api.store("alice", new_secret("at"))
    await api.store("bob", new_secret("at"))
    first, again = await api.get(ALICE), await api.get(ALICE)
    assert first.status == again.status == 200
    assert first.headers["ETag"] == again.headers["ETag"]
    assert first.headers["ETag"] != (await api.get("/v1/tokens/techniek/bob")).headers["ETag"]
    await api.store("alice", new_secret("at"), force=True)
    after = await api.get(ALICE)
    assert after.json()["access_token"] != first.json()["access_token"]
    assert after.headers["ETag"] != first.headers["ETag"]
    assert first.json()["access_token"] not in first.headers["ETag"]


async def test_if_none_match_with_the_current_tag_is_304_at_once(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """The current tag (or *) gets 304 without a body or token, with the tag and no-store;
    another tag gets the token."""
    await api.store("alice", new_secret("at"))
    tag = (await api.get(ALICE)).headers["ETag"]
    for condition in (tag, f"W/{tag}", "*"):
        reply = await api.get(ALICE, {"If-None-Match": condition})
        assert reply.status == 304
        assert reply.text == ""
        assert reply.headers["ETag"] == tag
        assert reply.headers["Cache-Control"] == "no-store"
    stale = await api.get(ALICE, {"If-None-Match": '"0000000000000000.1"'})
    assert stale.status == 200
    assert stale.headers["ETag"] == tag


async def test_wait_without_if_none_match_answers_at_once(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """`wait` alone has nothing to wait for: the token is served at once."""
    await api.store("alice", new_secret("at"))
    started = time.monotonic()
    reply = await api.get(ALICE + "?wait=30")
    assert reply.status == 200
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "query",
    ["wait=0", "wait=301", "wait=x", "wait=1&wait=2", "wait=", "wait=%C2%B2", "waits=5"],
)
async def test_a_bad_wait_is_a_400(
    api: Served, new_secret: Callable[[str], str], query: str
) -> None:
    """wait must be one whole number of seconds from 1 to 300; a misspelt name is refused."""
    await api.store("alice", new_secret("at"))
    assert_problem(await api.get(f"{ALICE}?{query}", {"If-None-Match": "*"}), 400, "bad_request")


# -- held requests --------------------------------------------------------------------------------


async def test_a_held_request_gets_the_new_token_as_soon_as_it_is_published(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """A request held with the current tag answers 200 with the new token and its tag within
    milliseconds of the publish, not when its wait ends."""
    await api.store("alice", new_secret("at"))
    tag = (await api.get(ALICE)).headers["ETag"]
    held = Tasks().spawn(api.get(ALICE + "?wait=30", {"If-None-Match": tag}), "held")
    await api.wait_held(1)
    new = new_secret("at")
    await api.store("alice", new, force=True)
    published = time.monotonic()
    reply = await asyncio.wait_for(held, QUICK)
    answered = time.monotonic()
    assert reply.status == 200
    assert reply.json()["access_token"] == new
    assert reply.headers["ETag"] != tag
    assert reply.headers["ETag"] == etag(api.cache.get("techniek", "alice"))  # type: ignore[arg-type]
    assert answered - published < 0.5
    assert api.watches.held_by(ME) == 0


async def test_a_write_that_keeps_the_token_does_not_answer_and_the_wait_ends_in_304(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """A same-generation write (an intent, a back-off) wakes nobody: the held request ends
    with 304 when its wait does."""
    grant = await api.store("alice", new_secret("at"))
    tag = etag(grant)
    started = time.monotonic()
    held = Tasks().spawn(api.get(ALICE + "?wait=1", {"If-None-Match": tag}), "held")
    await api.wait_held(1)
    assert api.cache.put(dataclasses.replace(grant, version=grant.version + 1, last_error="x"))
    reply = await asyncio.wait_for(held, QUICK)
    assert reply.status == 304
    assert reply.headers["ETag"] == tag
    assert time.monotonic() - started >= 1.0


async def test_a_held_request_ends_with_the_problem_a_new_request_would_get(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """Deleting the grant answers a held request 404; a lost rotation answers 409."""
    tasks = Tasks()
    for user, status, code in (("alice", 404, "grant_not_found"), ("bob", 409, "reauth_required")):
        grant = await api.store(user, new_secret("at"))
        path = f"/v1/tokens/techniek/{user}?wait=30"
        held = tasks.spawn(api.get(path, {"If-None-Match": etag(grant)}), user)
        await api.wait_held(1)
        if status == 404:
            await api.repository.delete(grant.id, api.clock())
            api.cache.drop("techniek", user)
        else:
            lost = dataclasses.replace(
                grant,
                state=GrantState.REAUTH_REQUIRED,
                last_error="rotation_lost: the provider's refresh_grace has passed",
                version=grant.version + 1,
            )
            api.cache.put(lost)
        assert_problem(await asyncio.wait_for(held, QUICK), status, code)


async def test_a_held_request_wakes_when_its_token_expires(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """A token that expires while held ends the wait with what a new request gets then (503
    here: nothing refreshes it), long before the wait would."""
    grant = await api.service.import_grant(
        Import("techniek", "alice", Secret(new_secret("rt")), Secret(new_secret("at")), 1),
        api.clock(),
    )
    assert grant[1]
    tag = (await api.get(ALICE)).headers["ETag"]
    started = time.monotonic()
    held = Tasks().spawn(api.get(ALICE + "?wait=30", {"If-None-Match": tag}), "held")
    await api.wait_held(1)
    api.clock.advance(2)
    reply = await asyncio.wait_for(held, QUICK)
    assert_problem(reply, 503, "token_unavailable")
    assert time.monotonic() - started < 5


async def test_held_requests_are_bounded_per_caller_and_a_client_that_leaves_frees_its_slot(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """Past the caller's limit a held request is 429 with Retry-After (as documented); when
    a held client disconnects its slot is free at once and the next one is held."""
    contract = Contract(load_document())
    async with served(tmp_path, held_per_caller=2) as api:
        grant = await api.store("alice", new_secret("at"))
        condition = {"If-None-Match": etag(grant)}
        tasks = Tasks()
        first = tasks.spawn(api.get(ALICE + "?wait=60", condition), "first")
        second = tasks.spawn(api.get(ALICE + "?wait=60", condition), "second")
        await api.wait_held(2)
        refused = await api.get(ALICE + "?wait=60", condition)
        assert_problem(refused, 429, "too_many_requests")
        assert refused.headers["Retry-After"] == "1"
        assert_conforms(contract, "GET", TOKEN, refused)
        first.cancel()  # the client gives up: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await api.wait_held(1)
        third = tasks.spawn(api.get(ALICE + "?wait=60", condition), "third")
        await api.wait_held(2)
        new = new_secret("at")
        await api.store("alice", new, force=True)
        for task in (second, third):
            reply = await asyncio.wait_for(task, QUICK)
            assert reply.status == 200
            assert reply.json()["access_token"] == new
        assert api.watches.held_by(ME) == 0


async def test_shutdown_answers_every_held_request_with_304(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """Stopping the listeners answers held requests 304 at once instead of letting them run
    into the shutdown's drain timeout."""
    grant = await api.store("alice", new_secret("at"))
    condition = {"If-None-Match": etag(grant)}
    tasks = Tasks()
    held = [tasks.spawn(api.get(ALICE + "?wait=300", condition), f"held {i}") for i in range(5)]
    await api.wait_held(5)
    started = time.monotonic()
    await api.stack.aclose()  # what the daemon does on SIGTERM: runner.cleanup()
    replies = await asyncio.wait_for(asyncio.gather(*held), QUICK)
    assert [r.status for r in replies] == [304] * 5
    assert time.monotonic() - started < 2.0


async def test_held_requests_count_as_served_and_stay_out_of_the_latency_histogram(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """A 304 counts as served; a held request's time (the caller's wait) is not observed as
    the broker's latency, an immediate one is."""
    grant = await api.store("alice", new_secret("at"))
    condition = {"If-None-Match": etag(grant)}
    name = "token_broker_token_request_duration_seconds_count"
    served = "token_broker_token_requests_total"
    assert (await api.get(ALICE, condition)).status == 304
    assert _sample(api.metrics, name) == 1
    assert (await api.get(ALICE + "?wait=1", condition)).status == 304
    assert _sample(api.metrics, name) == 1
    assert _sample(api.metrics, served, provider="techniek", outcome="served") == 2


async def test_304_and_the_held_200_conform_to_the_document(
    api: Served, new_secret: Callable[[str], str]
) -> None:
    """The 304 and the 200 that ends a held request are what docs/openapi.yaml describes."""
    contract = Contract(load_document())
    grant = await api.store("alice", new_secret("at"))
    condition = {"If-None-Match": etag(grant)}
    assert_conforms(contract, "GET", TOKEN, await api.get(ALICE, condition))
    held = Tasks().spawn(api.get(ALICE + "?wait=30", condition), "held")
    await api.wait_held(1)
    await api.store("alice", new_secret("at"), force=True)
    reply = await asyncio.wait_for(held, QUICK)
    assert reply.status == 200
    assert_conforms(contract, "GET", TOKEN, reply)
