"""The token route's steady state, answered before aiohttp's router and middlewares.

Most requests a broker answers are the same few: `GET /v1/tokens/PROVIDER/USER` on a Unix
socket connection that has asked before, for a grant whose token is fresh. `FastTokens` sits
in front of the application (`start_runner` wraps the server's request handler with it) and
answers exactly those, with what the full route would answer, byte for byte:

- the caller is the one the connection's peer credentials name (read once per connection, by
  the full route on the connection's first request), kept until the client rules are reloaded
  (`Policy.generation`); what it may fetch is decided per request, at the cost of a set lookup
  or two for the usual patterns (`GrantPatterns`), with nothing kept per grant;
- the grant is one `GrantService.ready` returns: the full route would serve it at once, with no
  wait, no store check and nothing else to say;
- the headers and the body around `expires_in` are built once per grant version; the body is
  put together once per second of `expires_in`; the clock is read once per request;
- on a keep-alive HTTP/1.1 connection (every client that asks again on its connection) the
  whole answer, status line to body, is kept as one buffer per second of `expires_in` and of
  the `Date` header, and handed to the connection's writer as it is (`_Written`): aiohttp's
  response machinery (header preparation and serialisation, the prepare hooks no fast answer
  has) would otherwise cost more than everything else here. It holds exactly the headers
  aiohttp would write (tests/test_fast.py compares the bytes on the wire); any other request
  gets an aiohttp `Response` with the same status, headers and body.

Everything else goes on to the application unchanged: another method or path, a query
(`min_ttl`, `wait`), `If-None-Match`, a body, a percent-encoded name, a TCP connection, a
connection's first request, a caller that may not fetch the grant, a grant that is not ready.
The full route then counts and answers it as always, so errors and every special case keep
one implementation.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from broker.api.context import CLOCK, METRICS, POLICY, SERVICE
from broker.api.handlers import token_body_around, token_headers
from broker.api.identity import Caller, Peer
from broker.api.watch import etag
from broker.metrics import HotCount
from broker.model import Grant

PREFIX = "/v1/tokens/"
# Bodies kept at most: a broker serving more grants than this rebuilds the rest per second.
MAX_BODIES = 4096
log = structlog.get_logger("broker.api")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _Connection:
    """Who one connection's caller is under one generation of the rules."""

    generation: int
    caller: Caller


@dataclass(slots=True)
class _Body:
    """One grant version's answer: the body around `expires_in`, the ETag, the last body and
    the last whole answer."""

    grant: Grant
    head: bytes
    tail: bytes
    tag: str  # the ETag
    expires_in: int = -1
    body: bytes = b""
    lines: str = ""  # the `token_headers` as written, once made
    wire_for: tuple[int, str] = (-1, "")  # the `expires_in` and `Date` of `wire`
    wire: bytes = b""  # status line, headers and body as aiohttp would write them

    def headers(self) -> dict[str, str]:
        """The headers for aiohttp's `Response` (when the answer is not `on_wire`)."""
        return token_headers(self.tag)

    def at(self, expires_in: int) -> bytes:
        if expires_in != self.expires_in:
            self.body = self.head + str(expires_in).encode() + self.tail
            self.expires_in = expires_in
        return self.body

    def on_wire(self, expires_in: int, date: str) -> bytes:
        """The whole answer on a keep-alive HTTP/1.1 connection, with this `Date`: the
        response's own headers, then Content-Length (aiohttp's Response adds it), then Date
        and Server (its StreamResponse adds them)."""
        if (expires_in, date) != self.wire_for:
            body = self.at(expires_in)
            if not self.lines:
                self.lines = "".join(f"{k}: {v}\r\n" for k, v in self.headers().items())
            self.wire = (
                f"HTTP/1.1 200 OK\r\n{self.lines}Content-Length: {len(body)}\r\n"
                f"Date: {date}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"
            ).encode() + body
            self.wire_for = (expires_in, date)
        return self.wire


class _Written(web.StreamResponse):
    """An answer written as one prepared buffer (`_Body.on_wire`) by the connection's writer,
    which keeps its accounting and flow control; for a keep-alive HTTP/1.1 request only."""

    def __init__(self, wire: bytes) -> None:
        super().__init__()
        self._wire = wire
        self._keep_alive = True

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is None:
            self._req = request
            self._payload_writer = request._payload_writer
        return self._payload_writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        writer = self._payload_writer
        assert writer is not None, "prepared first"
        assert not data, "the answer is whole"
        await writer.write_eof(self._wire)
        self._eof_sent = True
        self._req = None
        self._body_length = len(self._wire)
        self._payload_writer = None


class FastTokens:
    """Answers steady-state token requests ahead of the application (see the module doc)."""

    def __init__(self, app: web.Application, peers: weakref.WeakKeyDictionary[Any, Peer]) -> None:
        self._service = app[SERVICE]
        self._metrics = app[METRICS]
        self._policy = app[POLICY]
        self._clock = app[CLOCK]
        self._peers = peers
        self._connections: weakref.WeakKeyDictionary[Any, _Connection] = weakref.WeakKeyDictionary()
        self._bodies: dict[str, _Body] = {}
        self._served: dict[str, HotCount] = {}
        self.answered = 0  # requests answered here rather than by the application

    def wrap(self, handler: Handler) -> Handler:
        """`handler` (the application's), with steady-state token requests answered first."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            if request.method == "GET" and request.raw_path.startswith(PREFIX):
                try:
                    response = self.answer(request)
                except Exception:  # the full route answers instead; the log says what failed
                    log.exception("fast_path_failed")
                    response = None
                if response is not None:
                    return response
            return await handler(request)

        return handle

    def answer(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """The full route's answer to `request`, when it is the steady state; else None."""
        started = time.perf_counter()
        rest = request.raw_path[len(PREFIX) :]
        provider, sep, user = rest.partition("/")
        if (
            not sep
            or not provider
            or not user
            or "/" in user
            or "?" in user
            or "%" in rest
            or request.body_exists
            or "If-None-Match" in request.headers
        ):
            return None
        transport = request.transport
        if transport is None:
            return None
        connection = self._connection(transport)
        if connection is None:
            return None
        if not connection.caller.may_fetch(provider, user):
            return None
        now = self._clock()
        grant = self._service.ready(provider, user, now)
        if grant is None:
            return None
        body = self._body(grant)
        self._counter(provider).inc()
        expires_in = int(grant.access_ttl(now))
        response: web.StreamResponse
        if request.version == HttpVersion11 and request.keep_alive:
            response = _Written(body.on_wire(expires_in, rfc822_formatted_time()))
        else:
            response = web.Response(body=body.at(expires_in), headers=body.headers())
        self._metrics.token_request_duration.observe(time.perf_counter() - started)
        self.answered += 1
        return response

    def _connection(self, transport: Any) -> _Connection | None:
        """The connection's caller under the current rules; None before its first request
        (the full route reads its peer credentials then) or when it is not a Unix socket."""
        generation = self._policy.generation
        connection = self._connections.get(transport)
        if connection is not None and connection.generation == generation:
            return connection
        peer = self._peers.get(transport)
        if peer is None:
            return None
        caller = self._policy.unix_caller(peer.uid, peer.gid, peer.groups)
        connection = self._connections[transport] = _Connection(generation, caller)
        return connection

    def _body(self, grant: Grant) -> _Body:
        cached = self._bodies.get(grant.id)
        if cached is not None and cached.grant is grant:
            return cached
        if len(self._bodies) >= MAX_BODIES:
            self._bodies.clear()
        head, tail = token_body_around(grant)
        body = self._bodies[grant.id] = _Body(grant, head, tail, etag(grant))
        return body

    def _counter(self, provider: str) -> HotCount:
        counter = self._served.get(provider)
        label = self._metrics.provider_label(provider)
        if counter is None or label != provider:
            # A provider not (or no longer) configured counts as "other"; never cached.
            counter = self._metrics.token_requests.labels(provider=label, outcome="served")
            if label == provider:
                self._served[provider] = counter
        return counter
