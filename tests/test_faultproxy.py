"""The fault proxy forwards faithfully and injects exactly the fault that was armed.

Each test puts the proxy in front of a tiny aiohttp upstream that records what reaches it, and
looks from an aiohttp client: what the client receives or raises, and whether the upstream saw
the request.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.faultproxy import GARBLED_BODY, Fault, FaultProxy, Route, route_of

TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass
class Upstream:
    """An aiohttp app that records every request and answers with what it saw."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        record = {
            "method": request.method,
            "path": request.path,
            "query": request.rel_url.raw_query_string,
            "host": request.headers.get("Host"),
            "x_test": request.headers.get("X-Test"),
            "body": (await request.read()).decode(),
        }
        self.seen.append(record)
        if request.path == "/bad":
            return web.json_response({"error": "invalid_grant"}, status=400)
        response = web.json_response(record, headers={"X-Upstream": "yes"})
        response.set_cookie("a", "1")
        response.set_cookie("b", "2")
        return response

    def paths(self) -> list[str]:
        return [r["path"] for r in self.seen]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A recording upstream on 127.0.0.1."""
    state = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        state.url = str(server.make_url("")).rstrip("/")
        yield state


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[FaultProxy]:
    """A started proxy in front of the recording upstream."""
    async with FaultProxy(upstream.url) as running:
        yield running


async def _fetch(
    url: str, method: str = "GET", data: str | None = None, limit: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, headers, body."""
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=limit),
        ) as session,
        session.request(method, url, data=data, allow_redirects=False) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def test_routes_are_told_by_the_path() -> None:
    """Paths of DOT, Keycloak, Hydra and Auth0 endpoints map to their routes."""
    cases = {
        "/o/token/": Route.TOKEN,
        "/realms/r/protocol/openid-connect/token": Route.TOKEN,
        "/realms/r/protocol/openid-connect/token/introspect": Route.INTROSPECT,
        "/o/introspect/": Route.INTROSPECT,
        "/o/revoke_token/": Route.REVOKE,
        "/oauth2/revoke": Route.REVOKE,
        "/o/userinfo/": Route.USERINFO,
        "/o/device-authorization/": Route.DEVICE,
        "/oauth/device/code": Route.DEVICE,
        "/o/.well-known/openid-configuration": Route.DISCOVERY,
        "/.well-known/oauth-authorization-server/o": Route.DISCOVERY,
        "/o/.well-known/oauth-authorization-server": Route.DISCOVERY,
        "/o/.well-known/jwks.json": Route.JWKS,
        "/jwks": Route.JWKS,
        "/realms/r/protocol/openid-connect/certs": Route.JWKS,
        "/o/authorize/": Route.OTHER,
        "/accounts/login/": Route.OTHER,
        "/": Route.OTHER,
    }
    assert {path: route_of(path) for path in cases} == cases


async def test_forwards_the_request_and_returns_the_answer(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """Method, path, query, headers and body reach the upstream; its whole answer comes back."""
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(
            URL(f"{proxy.url}/o/token/?x=1&y=%2F%26", encoded=True),
            data="grant_type=refresh_token",
            headers={"X-Test": "kept", "Content-Type": "application/x-www-form-urlencoded"},
        ) as resp,
    ):
        body = await resp.json()
        cookies = resp.headers.getall("Set-Cookie")
        assert resp.status == 200
        assert resp.headers["X-Upstream"] == "yes"
    assert body == upstream.seen[0]
    assert body["method"] == "POST"
    assert (body["path"], body["query"]) == ("/o/token/", "x=1&y=%2F%26")
    assert body["x_test"] == "kept"
    assert body["body"] == "grant_type=refresh_token"
    assert body["host"] == f"127.0.0.1:{proxy.port}"  # the client's Host, not the upstream's
    assert sorted(c.split(";")[0] for c in cookies) == ["a=1", "b=2"]
    counts = proxy.counts[Route.TOKEN]
    assert (counts.seen, counts.forwarded, counts.faulted) == (1, 1, 0)
    assert proxy.applied == []


async def test_status_answers_without_forwarding(proxy: FaultProxy, upstream: Upstream) -> None:
    """STATUS answers 503 with Retry-After and a text body; the upstream never sees it."""
    armed = proxy.arm("token", Fault.STATUS, status=503, retry_after=7)
    status, headers, body = await _fetch(f"{proxy.url}/o/token/", "POST", "a=b")
    assert (status, headers["Retry-After"]) == (503, "7")
    assert headers["Content-Type"].startswith("text/plain")
    assert b"503" in body
    assert upstream.seen == []
    assert armed.done.is_set()
    assert (await _fetch(f"{proxy.url}/o/token/", "POST", "a=b"))[0] == 200  # count=1 spent
    assert upstream.paths() == ["/o/token/"]
    counts = proxy.counts["token"]
    assert (counts.seen, counts.forwarded, counts.faulted) == (2, 1, 1)
    assert [(a.route, a.fault, a.outcome) for a in proxy.applied] == [
        (Route.TOKEN, Fault.STATUS, "answered 503")
    ]


async def test_status_with_forward_lets_the_upstream_act(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """STATUS with forward=True sends the request on, then answers the status instead."""
    proxy.arm("token", Fault.STATUS, status=502, forward=True)
    assert (await _fetch(f"{proxy.url}/o/token/", "POST", "a=b"))[0] == 502
    assert upstream.paths() == ["/o/token/"]
    assert proxy.applied[0].outcome == "answered 502 instead of the upstream's 200"


async def test_faults_are_taken_in_order_per_route(proxy: FaultProxy, upstream: Upstream) -> None:
    """Faults on one route are taken first in, first out; other routes and "any" interleave."""
    proxy.arm("token", Fault.STATUS, 2, status=503)
    proxy.arm("any", Fault.STATUS, status=429)
    proxy.arm("token", Fault.STATUS, status=500)
    token, discovery = f"{proxy.url}/o/token/", f"{proxy.url}/o/.well-known/openid-configuration"
    assert (await _fetch(discovery))[0] == 429  # "any" is the oldest fault a discovery takes
    statuses = [(await _fetch(token, "POST", "x"))[0] for _ in range(4)]
    assert statuses == [503, 503, 500, 200]
    assert (await _fetch(discovery))[0] == 200
    assert upstream.paths() == ["/o/token/", "/o/.well-known/openid-configuration"]


async def test_reset_before_never_reaches_the_upstream(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """RESET_BEFORE reads the request and resets: the client gets ECONNRESET, upstream nothing."""
    armed = proxy.arm("token", Fault.RESET_BEFORE)
    with pytest.raises(aiohttp.ClientOSError) as caught:
        await _fetch(f"{proxy.url}/o/token/", "POST", "a=b")
    assert caught.value.errno == errno.ECONNRESET
    assert upstream.seen == []
    await asyncio.wait_for(armed.done.wait(), 5)
    assert proxy.applied[0].outcome == "reset before forwarding"
    assert (await _fetch(f"{proxy.url}/o/token/", "POST", "a=b"))[0] == 200


async def test_reset_after_lets_the_upstream_act(proxy: FaultProxy, upstream: Upstream) -> None:
    """RESET_AFTER forwards, then resets: the upstream acted and the client never hears of it."""
    proxy.arm("token", Fault.RESET_AFTER)
    with pytest.raises(aiohttp.ClientOSError) as caught:
        await _fetch(f"{proxy.url}/o/token/", "POST", "a=b")
    assert caught.value.errno == errno.ECONNRESET
    assert upstream.paths() == ["/o/token/"]
    assert proxy.applied[0].outcome == "reset after the upstream answered 200"


async def test_delay_outlasts_a_client_read_timeout(proxy: FaultProxy, upstream: Upstream) -> None:
    """DELAY holds a forwarded answer: a client with a shorter timeout gives up, unanswered."""
    proxy.arm("token", Fault.DELAY, 2, seconds=0.6)
    with pytest.raises(TimeoutError):
        await _fetch(f"{proxy.url}/o/token/", "POST", "a=b", limit=0.2)
    assert upstream.paths() == ["/o/token/"]
    started = time.monotonic()
    status, _, _ = await _fetch(f"{proxy.url}/o/token/", "POST", "a=b")
    assert status == 200
    assert time.monotonic() - started >= 0.6


async def test_garble_breaks_a_200_body_only(proxy: FaultProxy, upstream: Upstream) -> None:
    """GARBLE replaces a 200 body with non-JSON bytes (headers kept); a 400 passes unchanged."""
    proxy.arm("any", Fault.GARBLE, 2)
    status, headers, body = await _fetch(f"{proxy.url}/o/token/", "POST", "a=b")
    assert status == 200
    assert body == GARBLED_BODY
    assert int(headers["Content-Length"]) == len(GARBLED_BODY)
    assert headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError, match="Expecting"):
        json.loads(body)
    status, _, body = await _fetch(f"{proxy.url}/bad", "POST", "a=b")
    assert (status, json.loads(body)) == (400, {"error": "invalid_grant"})
    assert [a.outcome for a in proxy.applied] == ["garbled", "passed: the upstream answered 400"]
    assert len(upstream.seen) == 2


async def test_hold_waits_for_release_after_the_upstream_answered(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """HOLD: `arrived` is set once the upstream answered; the client hears only after release()."""
    armed = proxy.arm("token", Fault.HOLD)
    async with asyncio.TaskGroup() as group:
        client = group.create_task(_fetch(f"{proxy.url}/o/token/", "POST", "a=b"))
        await asyncio.wait_for(armed.arrived.wait(), 5)
        assert upstream.paths() == ["/o/token/"]
        await asyncio.sleep(0.2)
        assert not client.done()
        armed.release()
    status, _, body = client.result()
    assert status == 200
    assert json.loads(body)["path"] == "/o/token/"
    assert proxy.applied[0].outcome == "released"


async def test_hold_with_a_status_does_not_forward(proxy: FaultProxy, upstream: Upstream) -> None:
    """HOLD with status=503: `arrived` on arrival, nothing forwarded, 503 after release()."""
    armed = proxy.arm("token", Fault.HOLD, status=503, retry_after=3)
    async with asyncio.TaskGroup() as group:
        client = group.create_task(_fetch(f"{proxy.url}/o/token/", "POST", "a=b"))
        await asyncio.wait_for(armed.arrived.wait(), 5)
        await asyncio.sleep(0.1)
        assert not client.done()
        armed.release()
    status, headers, _ = client.result()
    assert (status, headers["Retry-After"]) == (503, "3")
    assert upstream.seen == []
    assert proxy.applied[0].outcome == "released, answered 503"


async def test_hold_ends_by_itself_at_its_limit(proxy: FaultProxy, upstream: Upstream) -> None:
    """A HOLD nobody releases answers after `seconds`, so a failing test cannot hang."""
    proxy.arm("token", Fault.HOLD, seconds=0.3)
    started = time.monotonic()
    assert (await _fetch(f"{proxy.url}/o/token/", "POST", "a=b"))[0] == 200
    assert 0.3 <= time.monotonic() - started < 5
    assert proxy.applied[0].outcome == "hold limit of 0.3 s reached"


async def test_refuse_closes_the_port_then_listens_again(
    proxy: FaultProxy, upstream: Upstream
) -> None:
    """REFUSE: new connections get ECONNREFUSED for `seconds`, then the same port answers."""
    url = f"{proxy.url}/o/token/"
    assert (await _fetch(url, "POST", "a=b"))[0] == 200
    port = proxy.port
    armed = proxy.arm("any", Fault.REFUSE, seconds=0.5)
    assert armed.arrived.is_set()
    assert not proxy.listening
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await _fetch(url, "POST", "a=b")
    assert caught.value.os_error.errno == errno.ECONNREFUSED
    await asyncio.wait_for(armed.done.wait(), 5)
    assert proxy.listening
    assert proxy.port == port
    assert (await _fetch(url, "POST", "a=b"))[0] == 200
    assert len(upstream.seen) == 2
    assert [(a.fault, a.outcome) for a in proxy.applied] == [(Fault.REFUSE, "listening again")]


async def test_arming_rejects_faults_that_cannot_work(proxy: FaultProxy) -> None:
    """REFUSE on one route, STATUS without a status and similar mistakes raise at arm()."""
    with pytest.raises(ValueError, match='arm it on "any"'):
        proxy.arm("token", Fault.REFUSE, seconds=1)
    with pytest.raises(ValueError, match="STATUS needs status"):
        proxy.arm("token", Fault.STATUS)
    with pytest.raises(ValueError, match="DELAY needs seconds"):
        proxy.arm("token", Fault.DELAY)
    with pytest.raises(ValueError, match="status= goes with"):
        proxy.arm("token", Fault.GARBLE, status=500)
    with pytest.raises(ValueError, match="'nowhere' is not a valid Route"):
        proxy.arm("nowhere", Fault.GARBLE)
    with pytest.raises(ValueError, match="loopback addresses only"):
        proxy.upstream = "http://192.0.2.1:80"


async def test_disarm_clears_faults_counts_and_holds(proxy: FaultProxy, upstream: Upstream) -> None:
    """disarm() releases a held answer, drops pending faults, and zeroes counts and records."""
    held = proxy.arm("token", Fault.HOLD)
    proxy.arm("token", Fault.STATUS, status=500)
    async with asyncio.TaskGroup() as group:
        client = group.create_task(_fetch(f"{proxy.url}/o/token/", "POST", "a=b"))
        await asyncio.wait_for(held.arrived.wait(), 5)
        proxy.disarm()
    assert client.result()[0] == 200
    assert proxy.applied == []
    assert proxy.counts["token"].seen == 0
    assert (await _fetch(f"{proxy.url}/o/token/", "POST", "a=b"))[0] == 200  # the 500 is gone


async def test_an_unreachable_upstream_is_a_502(upstream: Upstream) -> None:
    """With the upstream gone (or not yet set), the proxy answers 502 as a gateway would."""
    async with FaultProxy() as proxy:
        assert (await _fetch(f"{proxy.url}/o/token/"))[0] == 502
        proxy.upstream = upstream.url
        assert (await _fetch(f"{proxy.url}/o/token/"))[0] == 200
        proxy.upstream = "http://127.0.0.1:9"  # discard: nothing listens
        assert (await _fetch(f"{proxy.url}/o/token/"))[0] == 502
        assert proxy.counts["token"].upstream_errors == 2


async def test_starts_on_a_given_port_and_stops_with_a_hold_pending(upstream: Upstream) -> None:
    """start(port) binds that port; stop() releases a pending hold promptly, keeps the counts."""
    probe = FaultProxy(upstream.url)
    await probe.start()
    port = probe.port
    await probe.stop()
    proxy = FaultProxy(upstream.url)
    await proxy.start(port)
    assert proxy.url == f"http://127.0.0.1:{port}"
    armed = proxy.arm("token", Fault.HOLD)
    async with asyncio.TaskGroup() as group:
        client = group.create_task(_fetch(f"{proxy.url}/o/token/", "POST", "a=b"))
        await asyncio.wait_for(armed.arrived.wait(), 5)
        started = time.monotonic()
        await proxy.stop()
        assert time.monotonic() - started < 3
    assert client.result()[0] == 200
    assert proxy.counts["token"].faulted == 1
    assert [a.outcome for a in proxy.applied] == ["released"]
