"""The token route's steady state, answered before aiohttp's router and middlewares.

Most requests a broker answers are the same few: `GET /v1/tokens/PROVIDER/USER` on a Unix
socket connection that has asked before, for a grant whose token is fresh. `FastTokens` sits
in front of the application (`start_runner` wraps the server's request handler with it) and
answers exactly those, with what the full route would answer, byte for byte:

- the caller is the one the connection's peer credentials name (read once per connection, by
  the full route on the connection's first request), and what it may fetch is remembered per
  caller and grant until the client rules are reloaded (`Policy.generation`);
- the grant is one `GrantService.ready` returns: the full route would serve it at once, with no
  wait, no store check and nothing else to say;
- the headers and the body around `expires_in` are built once per grant version; the body is
  put together once per second of `expires_in`; the clock is read once per request.

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
from multidict import CIMultiDict
from prometheus_client.metrics import Counter

from broker.api.context import CLOCK, METRICS, POLICY, SERVICE
from broker.api.handlers import NO_STORE, token_body_around
from broker.api.identity import Caller, Peer
from broker.api.watch import etag
from broker.model import Grant

PREFIX = "/v1/tokens/"
# Bodies kept at most: a broker serving more grants than this rebuilds the rest per second.
MAX_BODIES = 4096
# Access decisions kept per caller at most; past it they are made again (a pattern match each).
MAX_DECISIONS = 65536
log = structlog.get_logger("broker.api")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _Connection:
    """What one connection's caller is, and may fetch, under one generation of the rules."""

    generation: int
    caller: Caller
    allowed: dict[tuple[str, str], bool]  # shared by every connection of the same caller


@dataclass(slots=True)
class _Body:
    """One grant version's answer: the body around `expires_in`, the headers, the last body."""

    grant: Grant
    head: bytes
    tail: bytes
    headers: CIMultiDict[str]
    expires_in: int = -1
    body: bytes = b""

    def at(self, expires_in: int) -> bytes:
        if expires_in != self.expires_in:
            self.body = self.head + str(expires_in).encode() + self.tail
            self.expires_in = expires_in
        return self.body


class FastTokens:
    """Answers steady-state token requests ahead of the application (see the module doc)."""

    def __init__(self, app: web.Application, peers: weakref.WeakKeyDictionary[Any, Peer]) -> None:
        self._service = app[SERVICE]
        self._metrics = app[METRICS]
        self._policy = app[POLICY]
        self._clock = app[CLOCK]
        self._peers = peers
        self._connections: weakref.WeakKeyDictionary[Any, _Connection] = weakref.WeakKeyDictionary()
        self._allowed: dict[Caller, dict[tuple[str, str], bool]] = {}
        self._allowed_generation = -1
        self._bodies: dict[str, _Body] = {}
        self._served: dict[str, Counter] = {}
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

    def answer(self, request: web.BaseRequest) -> web.Response | None:
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
        key = (provider, user)
        allowed = connection.allowed.get(key)
        if allowed is None:
            if len(connection.allowed) >= MAX_DECISIONS:
                connection.allowed.clear()
            allowed = connection.allowed[key] = connection.caller.may_fetch(provider, user)
        if not allowed:
            return None
        now = self._clock()
        grant = self._service.ready(provider, user, now)
        if grant is None:
            return None
        body = self._body(grant)
        self._counter(provider).inc()
        response = web.Response(body=body.at(int(grant.access_ttl(now))), headers=body.headers)
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
        if self._allowed_generation != generation:
            self._allowed, self._allowed_generation = {}, generation
        allowed = self._allowed.setdefault(caller, {})
        connection = self._connections[transport] = _Connection(generation, caller, allowed)
        return connection

    def _body(self, grant: Grant) -> _Body:
        cached = self._bodies.get(grant.id)
        if cached is not None and cached.grant is grant:
            return cached
        if len(self._bodies) >= MAX_BODIES:
            self._bodies.clear()
        headers = CIMultiDict(NO_STORE)
        headers["Content-Type"] = "application/json"
        headers["ETag"] = etag(grant)
        head, tail = token_body_around(grant)
        body = self._bodies[grant.id] = _Body(grant, head, tail, headers)
        return body

    def _counter(self, provider: str) -> Counter:
        counter = self._served.get(provider)
        label = self._metrics.provider_label(provider)
        if counter is None or label != provider:
            # A provider not (or no longer) configured counts as "other"; never cached.
            counter = self._metrics.token_requests.labels(provider=label, outcome="served")
            if label == provider:
                self._served[provider] = counter
        return counter
