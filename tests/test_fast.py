"""The token route's fast path (broker.api.fast) answers as the full route does, and only the
steady state: everything else reaches the application.

Served over a real Unix socket through `start_runner`, as the daemon serves; a connection's
first request always goes to the application (which reads the peer's credentials), so the
second request on one keep-alive connection is the first the fast path can answer.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from broker.api.app import FAST
from broker.api.handlers import token_body
from broker.model import Grant, GrantState, Secret, TokenSet
from tests.test_api import Api, Reply, _sample, served_api

PROVIDER, USER = "techniek", "alice"
TOKEN_PATH = f"/v1/tokens/{PROVIDER}/{USER}"
COMPARED_HEADERS = ("Content-Type", "Content-Length", "Cache-Control", "Pragma", "ETag")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The API with one grant holding a live access token."""
    async with served_api(tmp_path) as served:
        reply = await served.import_grant(
            provider=PROVIDER,
            user=USER,
            refresh_token="fast-refresh-token-value",
            access_token="fast-access-token-value",
            expires_in=3600,
        )
        assert reply.status == 201, reply.text
        yield served


def answered(api: Api) -> int:
    """How many requests the fast path has answered."""
    return api.app[FAST].answered


async def on_a_new_connection(api: Api, path: str) -> Reply:
    """GET `path` on a connection of its own: its first request, which the application answers."""
    connector = aiohttp.UnixConnector(path=str(api.socket), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://broker" + path) as response,
    ):
        return Reply(response.status, response.headers, await response.text())


def same_answer(full: Reply, fast: Reply) -> None:
    assert (fast.status, fast.text) == (full.status, full.text)
    for name in COMPARED_HEADERS:
        assert fast.headers.get(name) == full.headers.get(name), name


async def test_the_steady_state_is_answered_by_the_fast_path_exactly_as_the_full_route_does(
    api: Api,
) -> None:
    before = answered(api)
    full = await on_a_new_connection(api, TOKEN_PATH)
    assert answered(api) == before
    fast = await api.call("GET", TOKEN_PATH)  # the import opened this connection
    assert answered(api) == before + 1
    assert full.status == 200
    assert full.json()["access_token"] == "fast-access-token-value"
    same_answer(full, fast)
    exposition = await api.metrics_text()
    served = _sample(
        exposition, "token_broker_token_requests_total", provider=PROVIDER, outcome="served"
    )
    assert served == 2


async def test_expires_in_counts_down_and_a_new_token_is_served_at_once(api: Api) -> None:
    before = answered(api)
    first = await api.call("GET", TOKEN_PATH)
    api.clock.advance(10)
    later = await api.call("GET", TOKEN_PATH)
    assert answered(api) == before + 2
    assert later.json()["expires_in"] == first.json()["expires_in"] - 10
    reply = await api.import_grant(
        provider=PROVIDER,
        user=USER,
        refresh_token="fast-refresh-token-second",
        access_token="fast-access-token-second",
        expires_in=3600,
        force=True,
    )
    assert reply.status in (200, 201), reply.text
    replaced = await api.call("GET", TOKEN_PATH)
    assert replaced.json()["access_token"] == "fast-access-token-second"
    assert replaced.headers["ETag"] != first.headers["ETag"]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (TOKEN_PATH + "?min_ttl=60", None),  # a query: the full route parses it
        (TOKEN_PATH, {"If-None-Match": '"x"'}),  # a condition: the full route decides
        (f"/v1/tokens/{PROVIDER}/{USER}/more", None),  # no such route
        (f"/v1/tokens/{PROVIDER}/bob", None),  # no such grant
    ],
)
async def test_anything_but_the_steady_state_reaches_the_application(
    api: Api, path: str, headers: dict[str, str] | None
) -> None:
    before = answered(api)
    full = await api.call("GET", path, headers=headers)
    assert answered(api) == before
    assert full.status in (200, 304, 404), full.text


async def test_an_expired_token_is_left_to_the_full_route(api: Api) -> None:
    before = answered(api)
    api.clock.advance(3600)
    reply = await api.call("GET", TOKEN_PATH)
    assert answered(api) == before
    assert reply.status == 503


async def test_a_request_with_a_body_is_left_to_the_full_route(api: Api) -> None:
    before = answered(api)
    reply = await api.call("GET", TOKEN_PATH, data=b"{}")
    assert answered(api) == before
    assert reply.status == 200


async def test_a_percent_encoded_name_is_left_to_the_router(api: Api) -> None:
    before = answered(api)
    url = URL(f"http://broker/v1/tokens/{PROVIDER}/%61lice", encoded=True)
    async with api.session.get(url) as response:
        body = await response.json()
    assert answered(api) == before
    assert response.status == 200
    assert body["user"] == USER


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=200)
@given(texts, texts, texts, texts, st.integers(0, 10**9))
def test_the_body_put_together_around_expires_in_is_the_json_of_the_whole(
    token: str, token_type: str, provider: str, user: str, expires_in: int
) -> None:
    """The parts kept per grant version, with the number between them, are byte for byte what
    one json.dumps of the whole answer gives, whatever the strings hold (quotes, escapes)."""
    grant = Grant(
        id="0" * 32,
        provider=provider,
        user=user,
        state=GrantState.ACTIVE,
        generation=1,
        tokens=TokenSet(access_token=Secret(token)),
        scopes=("a", "b"),
        token_type=token_type,
        access_expires_at=datetime(2026, 12, 6, 12, tzinfo=UTC),
    )
    whole = {
        "access_token": token,
        "token_type": token_type,
        "expires_in": expires_in,
        "expires_at": "2026-12-06T12:00:00Z",
        "scope": "a b",
        "provider": provider,
        "user": user,
    }
    assert token_body(grant, expires_in) == json.dumps(whole).encode()


async def exchange(socket: Path, requests: list[bytes]) -> list[bytes]:
    """Each request sent on one raw connection in turn, and each whole answer as received."""
    reader, writer = await asyncio.open_unix_connection(str(socket))
    answers = []
    try:
        for raw in requests:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head, re.IGNORECASE)
            assert length is not None, head
            answers.append(head + await reader.readexactly(int(length[1])))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


def undated(answer: bytes) -> bytes:
    """The answer with its Date header's value blanked (the two may straddle a second)."""
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", answer)


@pytest.mark.parametrize(
    ("version", "connection"),
    [
        ("HTTP/1.1", None),  # the written buffer
        ("HTTP/1.1", "keep-alive"),
        ("HTTP/1.0", "keep-alive"),  # aiohttp's Response: it adds Connection: keep-alive
    ],
)
async def test_the_fast_answer_on_the_wire_is_the_full_routes_byte_for_byte(
    api: Api, version: str, connection: str | None
) -> None:
    """Status line, every header in aiohttp's order (Content-Length, Date, Server included)
    and body: the bytes the client reads are the same whichever path answered."""
    extra = f"Connection: {connection}\r\n" if connection else ""
    raw = f"GET {TOKEN_PATH} {version}\r\nHost: broker\r\n{extra}\r\n".encode()
    before = answered(api)
    full, fast, again = await exchange(api.socket, [raw, raw, raw])
    assert answered(api) == before + 2  # the first request on a connection is the full route's
    assert full.startswith(f"{version} 200 OK\r\n".encode()), full
    assert b'"access_token": "fast-access-token-value"' in full
    assert undated(fast) == undated(full)
    assert undated(again) == undated(full)


async def test_a_closing_request_is_answered_in_full_and_the_connection_closed(api: Api) -> None:
    """`Connection: close` on HTTP/1.1: aiohttp's Response says so in a header and closes."""
    keep = f"GET {TOKEN_PATH} HTTP/1.1\r\nHost: broker\r\n\r\n".encode()
    close = f"GET {TOKEN_PATH} HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n".encode()
    reader, writer = await asyncio.open_unix_connection(str(api.socket))
    try:
        before = answered(api)
        writer.write(keep + close)  # pipelined: the second is the fast path's
        received = await asyncio.wait_for(reader.read(), 10)  # to the end: the broker closes
    finally:
        writer.close()
        await writer.wait_closed()
    assert answered(api) == before + 1
    first, _, second = received.partition(b"HTTP/1.1 200 OK\r\n")[2].partition(b"HTTP/1.1 ")
    assert b"Connection: close" not in first
    assert second.startswith(b"200 OK\r\n"), received
    assert b"\r\nConnection: close\r\n" in second
