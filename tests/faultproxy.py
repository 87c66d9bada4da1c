"""A fault-injecting reverse proxy for an identity provider, in-process on 127.0.0.1.

`FaultProxy(upstream)` forwards every request (method, path and query, headers, body) to the
upstream and returns its answer. The `Host` header the client sent is kept, so an upstream that
builds absolute URLs from it (Django does) names the proxy in its documents. Cookies pass
through untouched (the proxy keeps none), and bodies are not decompressed on the way.

Faults are armed per route and taken first in, first out, one request at a time, each for
`count` requests: `proxy.arm("token", Fault.STATUS, status=503)`. A request takes the oldest
armed fault whose route is its own or "any". What the client sees:

    REFUSE        no listener on the port for `seconds`, then the same port listens again;
                  a new connection fails with ECONNREFUSED (aiohttp: ClientConnectorError).
                  Connections already open are closed when idle. Route "any" only: the
                  kernel refuses before any request names a route.
    RESET_BEFORE  the request is read, then the connection is reset (RST, SO_LINGER 0);
                  the upstream never sees it (aiohttp: ClientOSError ECONNRESET).
    RESET_AFTER   forwarded, the upstream's whole answer read, then the client's connection
                  reset: the upstream has acted and the client never hears.
    STATUS        `status` with a small text body, `Retry-After: retry_after` when given,
                  not forwarded (as a load balancer answers); `forward=True` forwards first
                  and answers `status` instead of the upstream's answer.
    DELAY         forwarded; the answer is held `seconds` before it is sent.
    GARBLE        forwarded; a 200 answer's body is replaced by bytes that are not JSON
                  (status and headers kept, Content-Length fixed). Other answers pass.
    HOLD          forwarded; the answer waits until the test calls `armed.release()`.
                  `armed.arrived` is set once the upstream has answered. With `status`, the
                  request is not forwarded (unless `forward=True`): `arrived` is set when it
                  arrives and `status` is answered after release. A hold ends by itself
                  after `seconds` (default HOLD_LIMIT) so a failing test cannot wedge the run.

A request the upstream cannot be reached for is answered 502, as a gateway would.

Observability: `proxy.counts[route]` (seen, forwarded, faulted, upstream_errors), and
`proxy.applied`, every fault taken, in order. `proxy.disarm()` clears all of it, releases
held answers and ends a refusal window.

In front of the test IdP, the `proxied_idp_factory` fixture starts the proxy first, then the
IdP with its issuer pinned to the proxy's origin, then points the proxy at the IdP: discovery,
JWKS, login pages, token, introspection and revocation requests of anything configured with
`idp.issuer` all pass through the proxy, and ID tokens name the proxy as `iss`.

The proxy runs on the test's event loop: a test that blocks the loop (a synchronous wait for a
daemon that is calling the IdP) blocks the proxy too; run such waits with asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from broker.tasks import Tasks
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory

HOST = "127.0.0.1"
HOLD_LIMIT = 30.0  # seconds a HOLD waits for release() before answering by itself
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=60)
STOP_GRACE = 2.0  # seconds stop() lets requests in flight finish
GARBLED_BODY = b'{"garbled by the fault proxy": tr'  # truncated: not JSON
# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",  # recomputed for the body actually sent
    }
)


class Fault(enum.StrEnum):
    """What the proxy does to a request that takes an armed fault (module docstring)."""

    REFUSE = "refuse"
    RESET_BEFORE = "reset_before"
    RESET_AFTER = "reset_after"
    STATUS = "status"
    DELAY = "delay"
    GARBLE = "garble"
    HOLD = "hold"


class Route(enum.StrEnum):
    """The endpoint a request is for, told by its path (`route_of`); ANY matches all."""

    TOKEN = "token"
    DISCOVERY = "discovery"
    JWKS = "jwks"
    INTROSPECT = "introspect"
    REVOKE = "revoke"
    USERINFO = "userinfo"
    DEVICE = "device"
    OTHER = "other"
    ANY = "any"


_JWKS_NAMES = frozenset({"jwks", "jwks.json", "certs", "keys"})
_BY_LAST_SEGMENT = {
    "token": Route.TOKEN,
    "introspect": Route.INTROSPECT,  # Keycloak's .../token/introspect too
    "introspection": Route.INTROSPECT,
    "revoke": Route.REVOKE,
    "revoke_token": Route.REVOKE,
    "revoke-token": Route.REVOKE,
    "revocation": Route.REVOKE,
    "userinfo": Route.USERINFO,
    "device-authorization": Route.DEVICE,
    "device_authorization": Route.DEVICE,
    "devicecode": Route.DEVICE,
} | dict.fromkeys(_JWKS_NAMES, Route.JWKS)


def route_of(path: str) -> Route:
    """The route of a request path, by its last segment (DOT's, Keycloak's, Hydra's names)."""
    segments = [s for s in path.lower().split("/") if s]
    last = segments[-1] if segments else ""
    if ".well-known" in segments:
        return Route.JWKS if last in _JWKS_NAMES else Route.DISCOVERY
    if segments[-2:] == ["device", "code"]:  # Auth0's /oauth/device/code
        return Route.DEVICE
    return _BY_LAST_SEGMENT.get(last, Route.OTHER)


@dataclass
class RouteCounts:
    """Requests on one route: seen, sent to the upstream, given a fault, unable to reach it."""

    seen: int = 0
    forwarded: int = 0
    faulted: int = 0
    upstream_errors: int = 0


@dataclass
class Applied:
    """One fault taken by one request; `outcome` says how it ended (it changes until then)."""

    route: Route
    fault: Fault
    method: str
    path: str  # without the query string, which may carry a token
    outcome: str = "in progress"


@dataclass(eq=False)
class Armed:
    """An armed fault: its parameters, how many requests it has taken, and its events.

    `arrived`: HOLD, set when the held answer is ready (the upstream answered, or, for a
    status HOLD, the request arrived); REFUSE, set when the port stopped listening.
    `done`: set when `count` requests have taken it and each has been answered or reset
    (REFUSE: when the port listens again).
    """

    route: Route
    fault: Fault
    count: int
    status: int | None
    retry_after: int | str | None
    seconds: float | None
    forward: bool
    taken: int = field(default=0, init=False)
    arrived: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    released: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    done: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _active: int = field(default=0, init=False, repr=False)

    @property
    def remaining(self) -> int:
        """Requests this fault will still take."""
        return self.count - self.taken

    def release(self) -> None:
        """Let held answers go (and any later request of this HOLD pass without waiting)."""
        self.released.set()

    def _take(self) -> None:
        self.taken += 1
        self._active += 1

    def _finish_one(self) -> None:
        self._active -= 1
        if self.remaining == 0 and self._active == 0:
            self.done.set()


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    reason: str | None
    headers: CIMultiDict[str]
    body: bytes


class _UpstreamError(Exception):
    """The upstream could not be reached or did not answer."""


def _check_loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the fault proxy forwards to loopback addresses only, not {url!r}")
    return url.rstrip("/")


def _end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The headers without hop-by-hop ones, including those the Connection header names."""
    named = {
        name.strip().lower()
        for value in headers.getall("Connection", [])
        for name in value.split(",")
    }
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP | named)


def _reset(request: web.BaseRequest) -> None:
    """Close the client's connection with an RST instead of a FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _status_answer(status: int, retry_after: int | str | None) -> _Answer:
    headers = CIMultiDict({"Content-Type": "text/plain; charset=utf-8"})
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return _Answer(status, None, headers, f"{status}: injected by the fault proxy\n".encode())


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; whether it was set."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that forwards to `upstream` and injects armed faults."""

    def __init__(self, upstream: str | None = None) -> None:
        self._upstream = None if upstream is None else _check_loopback(upstream)
        self.counts: defaultdict[str, RouteCounts] = defaultdict(RouteCounts)
        self.applied: list[Applied] = []
        # When (epoch seconds) each request arrived, and its route: a test can tell whether
        # something happened before or after the provider was asked.
        self.arrivals: list[tuple[float, Route]] = []
        self._armed: list[Armed] = []  # waiting for requests, in the order armed
        self._every: list[Armed] = []  # all armed since the last disarm(), to release them
        self._tasks = Tasks()
        self._port = 0
        self._anchor: socket.socket | None = None
        self._web: web.Server | None = None
        self._server: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._refusing = False
        self._refuse_over = asyncio.Event()
        self._stopping = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def upstream(self) -> str | None:
        """Where requests go: an http://127.0.0.1:PORT origin (settable while running)."""
        return self._upstream

    @upstream.setter
    def upstream(self, url: str) -> None:
        self._upstream = _check_loopback(url)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The proxy's origin, http://127.0.0.1:PORT."""
        assert self._port, "the proxy is not started"
        return f"http://{HOST}:{self._port}"

    @property
    def listening(self) -> bool:
        """Whether the port accepts connections now (False during a REFUSE window)."""
        return self._server is not None

    async def start(self, port: int = 0) -> FaultProxy:
        """Listen on `port` (0: a free one) and return self."""
        assert self._web is None, "the proxy is already started"
        # The anchor is bound for the proxy's whole life and never listens: it keeps the port
        # ours while REFUSE has closed the listener (SO_REUSEPORT lets the two share it).
        anchor = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        anchor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        anchor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        anchor.bind((HOST, port))
        self._anchor, self._port = anchor, anchor.getsockname()[1]
        self._web = web.Server(self._handle, access_log=None)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=UPSTREAM_TIMEOUT,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        await self._listen()
        return self

    async def stop(self) -> None:
        """Release every hold, stop listening, and end the connections (bounded).

        The counts and the applied faults stay readable afterwards.
        """
        self._stopping.set()
        self._let_go()
        await self._tasks.cancel_all()
        self._close_listener()
        if self._web is not None:
            await self._web.shutdown(STOP_GRACE)
            self._web = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._anchor is not None:
            self._anchor.close()
            self._anchor = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _listen(self) -> None:
        assert self._web is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, self._port))
        sock.listen(128)
        sock.setblocking(False)
        self._server = await asyncio.get_running_loop().create_server(self._web, sock=sock)

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # -- arming ---------------------------------------------------------------------------

    def arm(
        self,
        route: Route | str,
        fault: Fault | str,
        count: int = 1,
        *,
        status: int | None = None,
        retry_after: int | str | None = None,
        seconds: float | None = None,
        forward: bool = False,
    ) -> Armed:
        """Arm `fault` for the next `count` requests on `route` (after those armed before)."""
        armed = Armed(Route(route), Fault(fault), count, status, retry_after, seconds, forward)
        _validate(armed)
        self._every.append(armed)
        if armed.fault is Fault.REFUSE:
            self._refuse(armed)
        else:
            self._armed.append(armed)
        return armed

    def disarm(self) -> None:
        """Drop armed faults, release held answers, end a refusal, and zero the counts."""
        self._let_go()
        self._every.clear()
        self.counts.clear()
        self.applied.clear()
        self.arrivals.clear()

    def _let_go(self) -> None:
        """Drop the faults not yet taken, release every hold, and end a refusal window."""
        for armed in self._every:
            armed.release()
        self._armed.clear()
        self._refuse_over.set()

    def _take(self, route: Route) -> Armed | None:
        for armed in self._armed:
            if armed.route in (route, Route.ANY):
                armed._take()
                if armed.remaining == 0:
                    self._armed.remove(armed)
                return armed
        return None

    def _refuse(self, armed: Armed) -> None:
        if self._web is None:
            raise RuntimeError("start the proxy before arming REFUSE")
        if self._refusing:
            raise RuntimeError("the proxy is already refusing connections")
        armed._take()
        self._refusing = True
        self._refuse_over = asyncio.Event()
        self._close_listener()
        for connection in self._web.connections:
            connection.close()  # idle keep-alive connections end now, busy ones after answering
        record = Applied(Route.ANY, Fault.REFUSE, "", "", f"refusing for {armed.seconds} s")
        self.applied.append(record)
        armed.arrived.set()
        self._tasks.spawn(self._reopen(armed, record), name="fault-proxy-reopen")

    async def _reopen(self, armed: Armed, record: Applied) -> None:
        assert armed.seconds is not None
        try:
            await _wait(self._refuse_over, armed.seconds)
            if not self._stopping.is_set():
                await self._listen()
                record.outcome = "listening again"
        finally:
            self._refusing = False
            armed._finish_one()

    # -- requests -------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        route = route_of(request.path)
        counts = self.counts[route]
        counts.seen += 1
        self.arrivals.append((time.time(), route))
        body = await request.read()
        armed = self._take(route)
        if armed is None:
            return _response(await self._forward_or_502(request, body, route))
        counts.faulted += 1
        record = Applied(route, armed.fault, request.method, request.path)
        self.applied.append(record)
        try:
            answer = await self._apply(armed, record, request, body, route)
        finally:
            armed._finish_one()
        # After a reset nothing can be written; aiohttp drops the attempt (ConnectionError).
        return web.Response() if answer is None else _response(answer)

    async def _apply(
        self,
        armed: Armed,
        record: Applied,
        request: web.BaseRequest,
        body: bytes,
        route: Route,
    ) -> _Answer | None:
        """The answer to send, or None when the connection was reset."""
        fault = armed.fault
        if fault is Fault.RESET_BEFORE:
            _reset(request)
            record.outcome = "reset before forwarding"
            return None
        upstream: _Answer | None = None
        if armed.status is None or armed.forward:
            try:
                upstream = await self._forward(request, body, route)
            except _UpstreamError as exc:
                record.outcome = f"upstream unreachable ({exc}): answered 502"
                armed.arrived.set()
                return _status_answer(502, None)
        if fault is Fault.HOLD:
            armed.arrived.set()
            limit = HOLD_LIMIT if armed.seconds is None else armed.seconds
            released = await _wait(armed.released, limit)
            record.outcome = "released" if released else f"hold limit of {limit} s reached"
        elif fault is Fault.DELAY:
            assert armed.seconds is not None
            await _wait(self._stopping, armed.seconds)
            record.outcome = f"delayed {armed.seconds} s"
        elif fault is Fault.RESET_AFTER:
            _reset(request)
            record.outcome = f"reset after the upstream answered {_status(upstream)}"
            return None
        return _final_answer(armed, record, upstream)

    async def _forward_or_502(self, request: web.BaseRequest, body: bytes, route: Route) -> _Answer:
        try:
            return await self._forward(request, body, route)
        except _UpstreamError:
            return _status_answer(502, None)

    async def _forward(self, request: web.BaseRequest, body: bytes, route: Route) -> _Answer:
        counts = self.counts[route]
        counts.forwarded += 1
        if self._upstream is None or self._session is None:
            counts.upstream_errors += 1
            raise _UpstreamError("no upstream set")
        url = URL(self._upstream + request.raw_path, encoded=True)
        try:
            async with self._session.request(
                request.method,
                url,
                headers=_end_to_end(request.headers),
                data=body or None,
                allow_redirects=False,
            ) as resp:
                data = await resp.read()
                return _Answer(resp.status, resp.reason, _end_to_end(resp.headers), data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            counts.upstream_errors += 1
            raise _UpstreamError(type(exc).__name__) from None


def _status(answer: _Answer | None) -> str:
    return "nothing" if answer is None else str(answer.status)


def _final_answer(armed: Armed, record: Applied, upstream: _Answer | None) -> _Answer:
    """What a request that was forwarded, held or delayed is answered with."""
    if armed.status is not None:
        answered = f"answered {armed.status}"
        if upstream is not None:
            answered += f" instead of the upstream's {upstream.status}"
        held = armed.fault is Fault.HOLD
        record.outcome = f"{record.outcome}, {answered}" if held else answered
        return _status_answer(armed.status, armed.retry_after)
    assert upstream is not None
    if armed.fault is Fault.GARBLE:
        if upstream.status != 200:
            record.outcome = f"passed: the upstream answered {upstream.status}"
            return upstream
        record.outcome = "garbled"
        headers = upstream.headers.copy()
        headers.popall("Content-Encoding", None)  # the new body is not encoded
        return _Answer(upstream.status, upstream.reason, headers, GARBLED_BODY)
    return upstream


def _response(answer: _Answer) -> web.Response:
    return web.Response(
        status=answer.status, reason=answer.reason, headers=answer.headers, body=answer.body
    )


def _validate(armed: Armed) -> None:
    if armed.count < 1:
        raise ValueError("count must be at least 1")
    fault = armed.fault
    if fault is Fault.REFUSE:
        if armed.route is not Route.ANY:
            raise ValueError(
                'REFUSE closes the listening port before any request names a route: arm it on "any"'
            )
        if armed.count != 1 or armed.seconds is None or armed.seconds <= 0:
            raise ValueError("REFUSE takes seconds > 0 (how long the port refuses) and count 1")
    if fault is Fault.STATUS and armed.status is None:
        raise ValueError("STATUS needs status=")
    if fault is Fault.DELAY and (armed.seconds is None or armed.seconds < 0):
        raise ValueError("DELAY needs seconds= (how long to hold the answer)")
    if armed.status is not None and fault not in (Fault.STATUS, Fault.HOLD):
        raise ValueError("status= goes with STATUS or HOLD only")
    if armed.status is not None and not 100 <= armed.status <= 599:
        raise ValueError(f"status {armed.status} is not an HTTP status")
    if armed.retry_after is not None and armed.status is None:
        raise ValueError("retry_after= goes with a status answer only")
    if armed.forward and armed.status is None:
        raise ValueError("forward=True goes with a status answer only (the others forward)")


class ProxiedIdPFactory(Protocol):
    """What `proxied_idp_factory` yields: `django_idp_factory`'s options, without `issuer`."""

    async def __call__(self, **options: Any) -> tuple[FaultProxy, DjangoIdP]: ...


@pytest.fixture
async def proxied_idp_factory(
    django_idp_factory: DjangoIdPFactory,
) -> AsyncIterator[ProxiedIdPFactory]:
    """Start (proxy, IdP) pairs whose issuer is the proxy; every proxy stops at the end."""
    proxies: list[FaultProxy] = []

    async def start(**options: Any) -> tuple[FaultProxy, DjangoIdP]:
        proxy = await FaultProxy().start()
        proxies.append(proxy)
        idp = await asyncio.to_thread(django_idp_factory, issuer=f"{proxy.url}/o", **options)
        proxy.upstream = idp.url
        return proxy, idp

    yield start
    for proxy in reversed(proxies):
        await proxy.stop()
