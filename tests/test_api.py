"""Tests for broker.api: the HTTP contract, served in-process on a real Unix socket.

The app is the one the daemon builds (`build_app`) over a real GrantService and SQLite store;
requests travel over a Unix socket (identified by SO_PEERCRED: the suite runs as root, so the
caller is admin) or a loopback TCP listener with bearer tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

import broker
from broker.api.app import BULK_BODY_BYTES, MAX_BODY_BYTES, build_app
from broker.api.identity import Policy
from broker.api.server import Limits, start_runner
from broker.api.sockets import BACKLOG, bind_unix
from broker.config import Config, parse_config
from broker.crypto import Keyring, write_keyring
from broker.daemon import Daemon
from broker.errors import ReauthRequired
from broker.grants import RETRY_AFTER_SECONDS, GrantService
from broker.login import LoginService
from broker.metrics import Metrics
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.engine import create_engine
from broker.store.logins import LoginRepository
from broker.store.migrate import upgrade
from broker.store.repository import GrantRepository

PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}
TOKEN_FIELDS = {
    "access_token",
    "token_type",
    "expires_in",
    "expires_at",
    "scope",
    "provider",
    "user",
}
SUMMARY_FIELDS = {
    "provider",
    "user",
    "sub",
    "state",
    "scopes",
    "access_expires_at",
    "next_refresh_at",
    "generation",
    "last_error",
}
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole HTTP response."""

    status: int
    headers: CIMultiDictProxy[str]
    text: str

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.text)


@dataclass(frozen=True, slots=True)
class Api:
    """A served API and what it is built from."""

    root: Path
    config: Config
    repository: GrantRepository
    service: GrantService
    metrics: Metrics
    clock: Clock
    session: aiohttp.ClientSession
    tcp_url: str | None
    policy: Policy
    socket: Path
    app: web.Application

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: object | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        tcp: bool = False,
    ) -> Reply:
        """One request, over the Unix socket or (tcp=True) the loopback TCP listener."""
        if tcp:
            assert self.tcp_url is not None
            async with (
                aiohttp.ClientSession() as session,
                session.request(
                    method, self.tcp_url + path, json=body, data=data, headers=headers
                ) as response,
            ):
                return Reply(response.status, response.headers, await response.text())
        async with self.session.request(
            method, "http://broker" + path, json=body, data=data, headers=headers
        ) as response:
            return Reply(response.status, response.headers, await response.text())

    async def import_grant(self, **body: object) -> Reply:
        """POST /v1/grants with `body`."""
        return await self.call("POST", "/v1/grants", body=body)

    async def metrics_text(self) -> str:
        """The Prometheus exposition served at /metrics."""
        reply = await self.call("GET", "/metrics")
        assert reply.status == 200
        return reply.text


def _config(root: Path, clients: Sequence[Mapping[str, object]] = ()) -> Config:
    provider = {
        "client_id": "broker-test",
        "scopes": ["openid", "profile"],
    }
    return parse_config(
        {
            "server": {"socket": "api.sock", "callback": "", "metrics": ""},
            "store": {"url": "sqlite:///broker.db", "key_file": "keys"},
            "providers": {
                name: provider
                | {
                    "issuer": f"https://idp.example.nl/{name}",
                    "redirect_uri": f"http://localhost:8000/cb/{name}/",
                }
                for name in ("techniek", "netid")
            },
            "clients": list(clients),
        },
        source="test",
        base_dir=root,
    )


@contextlib.asynccontextmanager
async def served_api(
    root: Path,
    *,
    clients: Sequence[Mapping[str, object]] = (),
    tcp: bool = False,
    limits: Limits | None = None,
) -> AsyncIterator[Api]:
    """The daemon's app over a migrated SQLite store, on a Unix socket (and TCP when asked)."""
    config = _config(root, clients)
    keyring = Keyring.generate(START)
    write_keyring(config.store.key_file, keyring, replace=False)
    clock = Clock(START)
    engine = create_engine(config.store.url)
    await upgrade(engine)
    repository = GrantRepository(engine, keyring)
    service = GrantService(repository, config.providers, clock=clock)
    await service.load()
    metrics = Metrics(config.providers)
    metrics.watch_grants(lambda: service.gauges(clock()))
    daemon = Daemon(config, {}, clock)
    policy = Policy(config.clients, os.getuid())
    logins = LoginService(LoginRepository(engine, repository.sealer), service, {})
    app = build_app(
        service=service,
        logins=logins,
        metrics=metrics,
        policy=policy,
        clock=clock,
        readiness=lambda: daemon.readiness(repository),
    )
    listener = bind_unix(config.server.socket, 0o600)
    try:
        async with contextlib.AsyncExitStack() as stack:
            runner = await start_runner(stack, app, limits)
            await web.SockSite(runner, listener.sock, backlog=BACKLOG).start()
            tcp_url = None
            if tcp:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                host, port = next(a for a in runner.addresses if isinstance(a, tuple))[:2]
                tcp_url = f"http://{host}:{port}"
            connector = aiohttp.UnixConnector(path=str(listener.path))
            async with aiohttp.ClientSession(connector=connector) as session:
                yield Api(
                    root,
                    config,
                    repository,
                    service,
                    metrics,
                    clock,
                    session,
                    tcp_url,
                    policy,
                    listener.path,
                    app,
                )
    finally:
        listener.remove()
        await engine.dispose()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The API on a Unix socket, with an empty store and a hand-moved clock."""
    async with served_api(tmp_path) as served:
        yield served


def assert_problem(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """Check that `reply` is a problem+json with this status and code; return its body."""
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = reply.json()
    assert set(body) == PROBLEM_FIELDS
    assert body["status"] == status
    assert body["code"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


def _sample(exposition: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


# -- GET /v1/tokens ---------------------------------------------------------------------------


async def test_an_imported_access_token_is_served_exactly(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """GET /v1/tokens returns the imported access token with exactly the contract's fields."""
    access = new_secret("at")
    created = await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=access,
        expires_in=3600,
    )
    assert created.status == 201, created.text
    reply = await api.call("GET", "/v1/tokens/techniek/alice")
    assert reply.status == 200, reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert set(body) == TOKEN_FIELDS
    assert body == {
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": 3600,
        "expires_at": "2030-01-02T04:04:05Z",
        "scope": "openid profile",
        "provider": "techniek",
        "user": "alice",
    }
    assert RFC3339_UTC.fullmatch(body["expires_at"])


async def test_expires_in_counts_down_with_the_clock(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """expires_in is the token's remaining life at the injected clock, expires_at stays put."""
    await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=new_secret("at"),
        expires_in=3600,
        scope="FGO FGOWS",
    )
    api.clock.advance(600)
    body = (await api.call("GET", "/v1/tokens/techniek/alice")).json()
    assert body["expires_in"] == 3000
    assert body["expires_at"] == "2030-01-02T04:04:05Z"
    assert body["scope"] == "FGO FGOWS"


async def test_an_unknown_grant_is_a_404_problem(api: Api) -> None:
    """A token request for a grant that does not exist is 404 grant_not_found, problem+json."""
    reply = await api.call("GET", "/v1/tokens/techniek/nobody")
    body = assert_problem(reply, 404, "grant_not_found")
    assert "techniek/nobody" in body["detail"]
    assert body["title"]
    assert body["type"]


async def test_an_expired_token_with_a_refresh_token_is_503_with_retry_after(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """Once the access token expired (and nothing refreshed it) the answer is 503 + Retry-After."""
    await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=new_secret("at"),
        expires_in=60,
    )
    api.clock.advance(61)
    reply = await api.call("GET", "/v1/tokens/techniek/alice")
    assert_problem(reply, 503, "token_unavailable")
    assert reply.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)


async def test_an_import_without_access_token_is_unavailable_until_refreshed(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """A grant imported with only a refresh token has no access token to serve yet: 503."""
    await api.import_grant(provider="techniek", user="alice", refresh_token=new_secret("rt"))
    reply = await api.call("GET", "/v1/tokens/techniek/alice")
    assert_problem(reply, 503, "token_unavailable")
    assert int(reply.headers["Retry-After"]) > 0


async def _insert_without_refresh_token(api: Api, access: str, expires_in: int) -> Grant:
    grant = Grant(
        id="",
        provider="techniek",
        user="carol",
        state=GrantState.ACTIVE,
        generation=0,
        tokens=TokenSet(access_token=Secret(access)),
        scopes=("openid",),
        access_expires_at=api.clock() + timedelta(seconds=expires_in),
    )
    stored = await api.repository.insert(grant, api.clock())
    await api.service.load()
    return stored


async def test_an_expired_grant_without_refresh_token_needs_reauth(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """No refresh token and an expired access token: the service and the API say reauth (409)."""
    access = new_secret("at")
    await _insert_without_refresh_token(api, access, expires_in=60)
    served = await api.service.token("techniek", "carol")
    assert served.tokens.access_token == Secret(access)  # still valid: served as usual
    api.clock.advance(60)
    with pytest.raises(ReauthRequired, match="no refresh token"):
        await api.service.token("techniek", "carol")
    reply = await api.call("GET", "/v1/tokens/techniek/carol")
    body = assert_problem(reply, 409, "reauth_required")
    assert "log in again" in body["detail"]
    # It needs a login, so an import replaces it without force.
    replaced = await api.import_grant(
        provider="techniek", user="carol", refresh_token=new_secret("rt")
    )
    assert replaced.status == 200, replaced.text


async def test_a_grant_without_refresh_token_cannot_meet_a_longer_min_ttl(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """While valid, a grant with no refresh token serves callers its life meets; one whose
    min_ttl asks more is 409 (no refresh can give it), and so is an admin's refresh."""
    access = new_secret("at")
    await _insert_without_refresh_token(api, access, expires_in=60)
    assert (await api.call("GET", "/v1/tokens/techniek/carol?min_ttl=30")).status == 200
    longer = await api.call("GET", "/v1/tokens/techniek/carol?min_ttl=90")
    assert "less than min_ttl asks" in assert_problem(longer, 409, "reauth_required")["detail"]
    refresh = await api.call("POST", "/v1/grants/techniek/carol/refresh")
    assert "needs a login" in assert_problem(refresh, 409, "reauth_required")["detail"]
    # An import over it, while its token is valid, still needs force.
    kept = await api.import_grant(provider="techniek", user="carol", refresh_token=new_secret("rt"))
    assert kept.status == 400, kept.text


@pytest.mark.parametrize(
    ("last_error", "served"),
    [("the IdP refused (400 invalid_grant)", True), ("rotation_lost: read timeout", False)],
    ids=["invalid_grant", "rotation_lost"],
)
async def test_a_refused_grant_serves_its_live_token_until_expiry_unless_rotation_was_lost(
    api: Api, new_secret: Callable[[str], str], last_error: str, served: bool
) -> None:
    """After invalid_grant the live token is served until expiry, then 409; after a lost
    rotation (the provider has likely deleted it) it is 409 at once."""
    access = new_secret("at")
    stored = await _insert_without_refresh_token(api, access, expires_in=3600)
    await api.repository.replace_tokens(
        replace(
            stored,
            state=GrantState.REAUTH_REQUIRED,
            tokens=replace(stored.tokens, refresh_token=Secret(new_secret("rt"))),
            last_error=last_error,
        ),
        stored.generation,
        api.clock(),
    )
    await api.service.load()
    reply = await api.call("GET", "/v1/tokens/techniek/carol")
    if served:
        assert reply.status == 200, reply.text
        assert reply.json()["access_token"] == access
        api.clock.advance(3600)
        reply = await api.call("GET", "/v1/tokens/techniek/carol")
    body = assert_problem(reply, 409, "reauth_required")
    assert last_error.split(":", maxsplit=1)[0] in body["detail"]


@pytest.mark.parametrize(
    "min_ttl",
    ["abc", "-1", "1.5", "", "86401", "1e3", "0x10", "%C2%B2", "9" * 5000],
    ids=[
        "text",
        "negative",
        "fraction",
        "empty",
        "too-large",
        "exponent",
        "hex",
        "superscript",
        "5000-digits",
    ],
)
async def test_min_ttl_must_be_a_whole_number_in_range(
    api: Api, new_secret: Callable[[str], str], min_ttl: str
) -> None:
    """A min_ttl that is not a whole number of seconds from 0 to 86400 is 400 bad_request."""
    await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=new_secret("at"),
        expires_in=3600,
    )
    reply = await api.call("GET", f"/v1/tokens/techniek/alice?min_ttl={min_ttl}")
    body = assert_problem(reply, 400, "bad_request")
    assert "min_ttl" in body["detail"]


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("minttl=60", "unknown query parameter 'minttl'"),
        ("min_ttl=0&=null", "unknown query parameter ''"),
        ("min_ttl=60&min_ttl=0", "give min_ttl once"),
    ],
)
async def test_unknown_or_repeated_query_parameters_are_refused(
    api: Api, new_secret: Callable[[str], str], query: str, detail: str
) -> None:
    """A misspelt or repeated parameter is a 400, not silently ignored."""
    await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=new_secret("at"),
        expires_in=3600,
    )
    reply = await api.call("GET", f"/v1/tokens/techniek/alice?{query}")
    body = assert_problem(reply, 400, "bad_request")
    assert body["detail"].startswith(detail)


@pytest.mark.parametrize("min_ttl", ["0", "60", "86400"])
async def test_a_valid_min_ttl_below_the_tokens_life_is_served(
    api: Api, new_secret: Callable[[str], str], min_ttl: str
) -> None:
    """min_ttl from 0 to 86400 is accepted; a token living longer than that is served as is."""
    access = new_secret("at")
    await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=access,
        expires_in=2 * 86400,
    )
    reply = await api.call("GET", f"/v1/tokens/techniek/alice?min_ttl={min_ttl}")
    assert reply.status == 200, reply.text
    assert reply.json()["access_token"] == access


# -- POST /v1/grants --------------------------------------------------------------------------


async def test_import_creates_then_refuses_a_duplicate_then_force_replaces(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """201 on create, 400 on a second import, 200 and a new generation with force."""
    first = await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=new_secret("at"),
        expires_in=3600,
    )
    assert first.status == 201
    assert first.json()["generation"] == 1
    duplicate = await api.import_grant(
        provider="techniek", user="alice", refresh_token=new_secret("rt")
    )
    body = assert_problem(duplicate, 400, "bad_request")
    assert "already exists" in body["detail"]
    assert "force" in body["detail"]
    replacement = new_secret("at")
    forced = await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=replacement,
        expires_in=1800,
        force=True,
    )
    assert forced.status == 200, forced.text
    assert forced.json()["generation"] == 2
    token = (await api.call("GET", "/v1/tokens/techniek/alice")).json()
    assert token["access_token"] == replacement
    assert token["expires_in"] == 1800


async def test_an_import_over_a_grant_that_needs_a_login_replaces_it_without_force(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """A refused grant holds nothing worth keeping: importing new tokens rescues it (200, the
    next generation, active again), with no force needed."""
    first = await api.import_grant(
        provider="techniek", user="alice", refresh_token=new_secret("rt")
    )
    assert first.status == 201
    stored = await api.repository.get("techniek", "alice")
    assert stored is not None
    refused = replace(stored, state=GrantState.REAUTH_REQUIRED, last_error="invalid_grant")
    await api.repository.replace_tokens(refused, stored.generation, api.clock())
    await api.service.load()
    access = new_secret("at")
    fresh = {"refresh_token": new_secret("rt"), "access_token": access, "expires_in": 1800}
    rescued = await api.import_grant(provider="techniek", user="alice", **fresh)
    assert rescued.status == 200, rescued.text
    assert rescued.json()["state"] == "active"
    assert rescued.json()["generation"] == stored.generation + 2
    token = await api.call("GET", "/v1/tokens/techniek/alice")
    assert token.json()["access_token"] == access


async def test_import_answers_with_the_summary_and_no_secret(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """The 201 body is the grant's summary: the contract's fields and no token value."""
    refresh, access = new_secret("rt"), new_secret("at")
    reply = await api.import_grant(
        provider="netid",
        user="bob@example.nl",
        refresh_token=refresh,
        access_token=access,
        expires_in=60,
    )
    assert reply.status == 201
    assert refresh not in reply.text
    assert access not in reply.text
    body = reply.json()
    assert set(body) >= SUMMARY_FIELDS
    assert body["provider"] == "netid"
    assert body["user"] == "bob@example.nl"
    assert body["state"] == "active"
    assert body["scopes"] == ["openid", "profile"]
    assert body["access_expires_at"] == "2030-01-02T03:05:05Z"


_VALID = {"provider": "techniek", "user": "alice", "refresh_token": "placeholder"}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({**_VALID, "bogus": 1}, "unknown field(s): bogus"),
        ({"provider": "techniek", "user": "alice"}, "refresh_token is required"),
        ({**_VALID, "refresh_token": ""}, "refresh_token must be a non-empty string"),
        ({**_VALID, "refresh_token": 42}, "refresh_token must be a non-empty string"),
        ({**_VALID, "refresh_token": "two words"}, "refresh_token must not contain whitespace"),
        ({**_VALID, "refresh_token": "tab\tbed"}, "refresh_token must not contain whitespace"),
        ({**_VALID, "refresh_token": "no\u00a0break"}, "refresh_token must not contain white"),
        ({**_VALID, "refresh_token": "ideo\u3000graphic"}, "refresh_token must not contain white"),
        ({**_VALID, "refresh_token": "unit\x1fsep"}, "refresh_token must not contain whitespace"),
        ({**_VALID, "access_token": "em\u2003space", "expires_in": 60}, "must not contain white"),
        ({**_VALID, "refresh_token": "x" * 16_385}, "at most 16384"),
        ({**_VALID, "access_token": "at", "expires_in": True}, "expires_in must be a whole number"),
        ({**_VALID, "access_token": "at", "expires_in": -5}, "expires_in must be a whole number"),
        ({**_VALID, "access_token": "at", "expires_in": 0}, "expires_in must be a whole number"),
        ({**_VALID, "access_token": "at", "expires_in": 10**12}, "expires_in must be a whole"),
        ({**_VALID, "access_token": "at", "expires_in": 60.5}, "expires_in must be a whole number"),
        ({**_VALID, "access_token": "at", "expires_in": "60"}, "expires_in must be a whole number"),
        ({**_VALID, "access_token": "at"}, "expires_in is required with access_token"),
        ({**_VALID, "provider": "nope"}, "unknown provider 'nope'"),
        ({**_VALID, "provider": ""}, "provider is required"),
        ({key: v for key, v in _VALID.items() if key != "user"}, "user is required"),
        ({**_VALID, "user": "bad user!"}, "user must match"),
        ({**_VALID, "user": "a" * 129}, "user must match"),
        ({**_VALID, "user": "../etc"}, "user must match"),
        ({**_VALID, "scope": ["openid"]}, "scope must be a space-separated string"),
        ({**_VALID, "force": "yes"}, "force must be true or false"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_import_rejects_malformed_bodies_saying_what(
    api: Api, new_secret: Callable[[str], str], body: dict[str, object], detail: str
) -> None:
    """Each malformed import is 400 bad_request whose detail names the problem; nothing stored."""
    secret = new_secret("rt")
    body = {k: (secret if v == "placeholder" else v) for k, v in body.items()}
    reply = await api.import_grant(**body)
    problem = assert_problem(reply, 400, "bad_request")
    assert detail in problem["detail"]
    assert secret not in reply.text
    assert (await api.call("GET", "/v1/grants")).json() == []


@pytest.mark.parametrize(
    ("data", "content_type", "detail"),
    [
        (b"{not json", "application/json", "not valid JSON"),
        (b"\xff\xfe", "application/json", "not valid JSON"),
        (b"[1, 2]", "application/json", "must be a JSON object"),
        (b'"text"', "application/json", "must be a JSON object"),
        (b'{"provider": "techniek"}', "text/plain", "Content-Type: application/json"),
    ],
    ids=["broken", "not-utf8", "array", "string", "wrong-content-type"],
)
async def test_import_rejects_bodies_that_are_not_a_json_object(
    api: Api, data: bytes, content_type: str, detail: str
) -> None:
    """A body that is not a JSON object (or not sent as JSON) is 400 with a detail saying so."""
    reply = await api.call("POST", "/v1/grants", data=data, headers={"Content-Type": content_type})
    assert detail in assert_problem(reply, 400, "bad_request")["detail"]


async def test_a_body_over_64_kib_is_413(api: Api) -> None:
    """A request body larger than 64 KiB is refused with 413 problem+json."""
    data = json.dumps({"provider": "techniek", "padding": "x" * MAX_BODY_BYTES}).encode()
    reply = await api.call(
        "POST", "/v1/grants", data=data, headers={"Content-Type": "application/json"}
    )
    assert_problem(reply, 413, "payload_too_large")


def _billing(new_secret: Callable[[str], str]) -> tuple[str, dict[str, Any]]:
    """A bearer token, and the `[[clients]]` entry of the non-admin client holding it."""
    bearer = new_secret("bearer")
    client = {
        "name": "billing",
        "token_sha256": hashlib.sha256(bearer.encode()).hexdigest(),
        "grants": ["techniek/*"],
    }
    return bearer, client


def _ndjson_of_size(size: int, new_secret: Callable[[str], str]) -> tuple[bytes, int]:
    """A bulk import body of new grants, just over `size` bytes; and how many lines."""
    lines: list[str] = []
    total = 0
    while total <= size:
        line = json.dumps(
            {
                "provider": "techniek",
                "user": f"user{len(lines):05d}",
                "refresh_token": new_secret("rt"),
            }
        )
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines).encode(), len(lines)


async def test_an_admin_bulk_import_may_be_larger_than_other_bodies(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """An admin's NDJSON import takes up to BULK_BODY_BYTES in one request (one transaction);
    over that it is 413 like any other body, and nothing of it is stored."""
    ndjson = {"Content-Type": "application/x-ndjson"}
    body, lines = _ndjson_of_size(MAX_BODY_BYTES * 2, new_secret)
    assert MAX_BODY_BYTES < len(body) < BULK_BODY_BYTES
    reply = await api.call("POST", "/v1/grants", data=body, headers=ndjson)
    assert reply.status == 200, reply.text
    assert reply.json() == {"created": lines, "replaced": 0, "failed": []}
    assert len(await api.repository.all()) == lines

    too_big, _ = _ndjson_of_size(BULK_BODY_BYTES, new_secret)
    reply = await api.call("POST", "/v1/grants", data=too_big, headers=ndjson)
    assert_problem(reply, 413, "payload_too_large")
    assert len(await api.repository.all()) == lines


async def test_the_larger_bulk_limit_is_for_admins_only(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """A caller who is not an admin gets no larger body for an NDJSON import: 413 over 64 KiB."""
    bearer, client = _billing(new_secret)
    async with served_api(tmp_path, clients=[client], tcp=True) as api:
        body, _ = _ndjson_of_size(MAX_BODY_BYTES * 2, new_secret)
        headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/x-ndjson"}
        reply = await api.call("POST", "/v1/grants", data=body, headers=headers, tcp=True)
        assert_problem(reply, 413, "payload_too_large")
        small, _ = _ndjson_of_size(1000, new_secret)
        reply = await api.call("POST", "/v1/grants", data=small, headers=headers, tcp=True)
        assert_problem(reply, 403, "forbidden")
        assert await api.repository.all() == []


# -- admin views --------------------------------------------------------------------------------


async def test_grant_views_have_every_field_and_no_secret(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """GET /v1/grants and /v1/grants/{p}/{u} list the contract's fields and no token value."""
    secrets = []
    for provider, user in (("techniek", "alice"), ("netid", "bob")):
        refresh, access = new_secret("rt"), new_secret("at")
        secrets += [refresh, access]
        reply = await api.import_grant(
            provider=provider,
            user=user,
            refresh_token=refresh,
            access_token=access,
            expires_in=3600,
        )
        assert reply.status == 201
    listing = await api.call("GET", "/v1/grants")
    one = await api.call("GET", "/v1/grants/techniek/alice")
    for reply in (listing, one):
        assert reply.status == 200
        for secret in secrets:
            assert secret not in reply.text
    grants = listing.json()
    assert [(g["provider"], g["user"]) for g in grants] == [("netid", "bob"), ("techniek", "alice")]
    for grant in [*grants, one.json()]:
        assert set(grant) >= SUMMARY_FIELDS
    assert one.json() == grants[1]
    assert one.json()["generation"] == 1
    assert one.json()["state"] == "active"
    assert one.json()["last_error"] is None
    assert one.json()["access_expires_at"] == "2030-01-02T04:04:05Z"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tokens/techniek/{user}"),
        ("GET", "/v1/grants/techniek/{user}"),
        ("POST", "/v1/grants/techniek/{user}/refresh"),
        ("DELETE", "/v1/grants/techniek/{user}"),
    ],
)
@pytest.mark.parametrize("user", ["bad%20user", "a%2Fb", "x" * 129, "%C3%A9"])
async def test_a_malformed_user_label_is_a_bad_request(
    api: Api, method: str, path: str, user: str
) -> None:
    """A USER that is not a label the contract allows is 400 bad_request, saying which form
    it must take, not 404 (it cannot name a grant)."""
    body = assert_problem(await api.call(method, path.format(user=user)), 400, "bad_request")
    assert "[A-Za-z0-9._@-]{1,128}" in body["detail"]


async def test_an_unknown_grant_view_is_404(api: Api) -> None:
    """GET /v1/grants/{p}/{u} for a missing grant is 404 grant_not_found."""
    assert_problem(await api.call("GET", "/v1/grants/techniek/nobody"), 404, "grant_not_found")


# -- routing --------------------------------------------------------------------------------------


async def test_an_unknown_route_is_a_404_problem(api: Api) -> None:
    """A path the API does not have is 404 as problem+json."""
    assert_problem(await api.call("GET", "/v2/nothing"), 404, "not_found")


async def test_a_wrong_method_is_a_405_problem_with_allow(api: Api) -> None:
    """A known path with the wrong method is 405 as problem+json, and says what is allowed."""
    reply = await api.call("DELETE", "/healthz")
    assert_problem(reply, 405, "method_not_allowed")
    assert "GET" in reply.headers["Allow"]


# -- health, readiness, metrics -------------------------------------------------------------------


async def test_healthz_answers_200(api: Api) -> None:
    """/healthz is 200 while the process runs."""
    reply = await api.call("GET", "/healthz")
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}


async def test_readyz_is_200_with_a_working_store_and_keyring(api: Api) -> None:
    """/readyz is 200 when the store answers and the keyring file holds the key in use."""
    reply = await api.call("GET", "/readyz")
    assert reply.status == 200, reply.text
    assert reply.json() == {"status": "ready"}


async def test_readyz_is_503_when_the_keyring_file_is_removed(api: Api) -> None:
    """Deleting the keyring file makes /readyz 503 with a reason naming the keyring."""
    api.config.store.key_file.unlink()
    reply = await api.call("GET", "/readyz")
    assert reply.status == 503
    body = reply.json()
    assert body["status"] == "unavailable"
    assert any(p.startswith("keys:") and "does not exist" in p for p in body["problems"])


async def test_readyz_is_503_when_the_keyring_file_is_too_open(api: Api) -> None:
    """A keyring file made 0644 makes /readyz 503 and the reason says to chmod 600."""
    api.config.store.key_file.chmod(0o644)
    reply = await api.call("GET", "/readyz")
    assert reply.status == 503
    assert any("chmod 600" in p for p in reply.json()["problems"])


async def test_readyz_is_503_when_the_keyring_lost_the_key_in_use(api: Api) -> None:
    """A keyring file that no longer holds the primary key in use makes /readyz 503."""
    write_keyring(api.config.store.key_file, Keyring.generate(START), replace=True)
    reply = await api.call("GET", "/readyz")
    assert reply.status == 503
    assert any("no longer holds the key in use" in p for p in reply.json()["problems"])


async def test_readiness_reports_a_store_that_does_not_answer(tmp_path: Path) -> None:
    """Daemon.readiness names the store when the database file is not a database."""
    config = _config(tmp_path)
    keyring = Keyring.generate(START)
    write_keyring(config.store.key_file, keyring, replace=False)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database file" * 200)
    engine = create_engine(f"sqlite:///{garbage}")
    try:
        problems = await Daemon(config, {}, Clock(START)).readiness(
            GrantRepository(engine, keyring)
        )
    finally:
        await engine.dispose()
    assert len(problems) == 1
    assert problems[0].startswith("store:")


async def test_metrics_count_token_requests_by_provider_and_outcome(
    api: Api, new_secret: Callable[[str], str]
) -> None:
    """served, not_found and bad_request are counted per configured provider; build_info is 1."""
    await api.import_grant(
        provider="techniek",
        user="alice",
        refresh_token=new_secret("rt"),
        access_token=new_secret("at"),
        expires_in=3600,
    )
    assert (await api.call("GET", "/v1/tokens/techniek/alice")).status == 200
    assert (await api.call("GET", "/v1/tokens/techniek/alice")).status == 200
    assert (await api.call("GET", "/v1/tokens/techniek/nobody")).status == 404
    assert (await api.call("GET", "/v1/tokens/techniek/alice?min_ttl=x")).status == 400
    text = await api.metrics_text()
    name = "token_broker_token_requests_total"
    assert _sample(text, name, provider="techniek", outcome="served") == 2
    assert _sample(text, name, provider="techniek", outcome="not_found") == 1
    assert _sample(text, name, provider="techniek", outcome="bad_request") == 1
    assert _sample(text, name, provider="netid", outcome="served") == 0
    assert _sample(text, "token_broker_build_info", version=broker.__version__) == 1
    assert _sample(text, "token_broker_grants", provider="techniek", state="active") == 1
    assert _sample(text, "token_broker_token_request_duration_seconds_count") == 4
    assert 'le="5e-05"' in text


async def test_an_unknown_provider_is_counted_as_other(api: Api) -> None:
    """Token requests for providers not in the config share provider="other": no new labels."""
    for provider in ("nope", "made-up", "x" * 60):
        assert (await api.call("GET", f"/v1/tokens/{provider}/alice")).status == 404
    text = await api.metrics_text()
    assert (
        _sample(text, "token_broker_token_requests_total", provider="other", outcome="not_found")
        == 3
    )
    providers = {
        sample.labels["provider"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "provider" in sample.labels
    }
    assert providers == {"techniek", "netid", "other"}
    assert "alice" not in text


# -- the TCP listener and bearer tokens -----------------------------------------------------------


async def test_tcp_requests_need_a_bearer_and_follow_the_clients_patterns(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """On TCP: no bearer is 401 with a challenge, a client's token gets its grants, others 403."""
    bearer, client = _billing(new_secret)
    async with served_api(tmp_path, clients=[client], tcp=True) as api:
        access = new_secret("at")
        for provider, token in (("techniek", access), ("netid", new_secret("at"))):
            reply = await api.import_grant(
                provider=provider,
                user="alice",
                refresh_token=new_secret("rt"),
                access_token=token,
                expires_in=3600,
            )
            assert reply.status == 201
        auth = {"Authorization": f"Bearer {bearer}"}

        anonymous = await api.call("GET", "/v1/tokens/techniek/alice", tcp=True)
        assert_problem(anonymous, 401, "unauthenticated")
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = {"Authorization": f"Bearer {new_secret('bearer')}"}
        assert_problem(
            await api.call("GET", "/v1/tokens/techniek/alice", headers=wrong, tcp=True),
            401,
            "unauthenticated",
        )

        allowed = await api.call("GET", "/v1/tokens/techniek/alice", headers=auth, tcp=True)
        assert allowed.status == 200, allowed.text
        assert allowed.json()["access_token"] == access
        assert allowed.headers["Cache-Control"] == "no-store"

        other = await api.call("GET", "/v1/tokens/netid/alice", headers=auth, tcp=True)
        assert_problem(other, 403, "forbidden")
        admin_only = await api.call("GET", "/v1/grants", headers=auth, tcp=True)
        assert_problem(admin_only, 403, "forbidden")

        assert (await api.call("GET", "/healthz", tcp=True)).status == 200
        text = await api.metrics_text()
        name = "token_broker_token_requests_total"
        assert _sample(text, name, provider="techniek", outcome="unauthenticated") == 2
        assert _sample(text, name, provider="techniek", outcome="served") == 1
        assert _sample(text, name, provider="netid", outcome="forbidden") == 1


async def test_unauthenticated_requests_count_only_on_the_token_route(tmp_path: Path) -> None:
    """A 401 on TCP counts as an unauthenticated token request only for GET /v1/tokens/P/U."""
    async with served_api(tmp_path, tcp=True) as api:
        for path in (
            "/v1/tokens/techniek/alice",
            "/v1/tokens/netid/bob",
            "/v1/tokens/techniek",
            "/v1/tokens/techniek/alice/more",
            "/v1/grants",
        ):
            assert_problem(await api.call("GET", path, tcp=True), 401, "unauthenticated")
        text = await api.metrics_text()
    name = "token_broker_token_requests_total"
    assert _sample(text, name, provider="techniek", outcome="unauthenticated") == 1
    assert _sample(text, name, provider="netid", outcome="unauthenticated") == 1
    assert _sample(text, "token_broker_token_request_duration_seconds_count") == 2
