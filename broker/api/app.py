"""The aiohttp application: routes, caller identification, and errors as problem+json."""

from __future__ import annotations

import asyncio
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.aiohttp import make_aiohttp_handler

from broker.api import handlers
from broker.api.context import (
    CALLER,
    CLOCK,
    LOGINS,
    METRICS,
    POLICY,
    READINESS,
    SERVICE,
    WATCHES,
)
from broker.api.fast import FastTokens
from broker.api.identity import ANONYMOUS, Caller, Peer, Policy, read_peer
from broker.api.problems import OUTCOMES, problem, problem_for, unauthenticated
from broker.api.server import FRONT
from broker.api.watch import MAX_HELD_PER_CALLER, Watches
from broker.errors import BrokerError
from broker.grants import GrantService
from broker.login import LoginService
from broker.metrics import Metrics

MAX_BODY_BYTES = 64 * 1024
# An admin's bulk import (POST /v1/grants as application/x-ndjson, one transaction per request)
# may be larger: SQLite writes each touched page once per transaction, so ~1,000 grants per
# transaction cost a quarter less each than ~250. Bounded so that one batch's work holds the
# event loop for tens of milliseconds at most.
BULK_BODY_BYTES = 256 * 1024
_TOKEN_ROUTE_NAME = "token"
_PUBLIC = frozenset({"/healthz", "/readyz", "/metrics"})
# The peer of each open Unix-socket connection; an entry goes when its transport does.
FAST = web.AppKey("fast", FastTokens)
PEERS: web.AppKey[weakref.WeakKeyDictionary[asyncio.BaseTransport, Peer]] = web.AppKey("peers")
log = structlog.get_logger("broker.api")


def _peer(request: web.Request) -> Peer | None:
    """The Unix-socket peer of this request's connection (read on its first request), or None."""
    transport = request.transport
    if transport is None:
        return None
    peers = request.app[PEERS]
    peer = peers.get(transport)
    if peer is None:
        # asyncio hands out a TransportSocket wrapper, which still answers getsockopt.
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        peer = peers[transport] = read_peer(sock)
    return peer


def _caller(request: web.Request) -> Caller | None:
    """The caller of this request, or None for a TCP request without a valid bearer."""
    peer = _peer(request)
    if peer is not None:
        # The policy is asked on every request, so a reload also governs open connections.
        return request.app[POLICY].unix_caller(peer.uid, peer.gid, peer.groups)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return request.app[POLICY].bearer_caller(token.strip())


@web.middleware
async def identify(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the caller; refuse unauthenticated TCP requests outside the public routes."""
    if request.path in _PUBLIC:
        request[CALLER] = ANONYMOUS
        return await handler(request)
    started = time.perf_counter()
    caller = _caller(request)
    if caller is None:
        if request.match_info.route.name == _TOKEN_ROUTE_NAME:
            request.app[METRICS].count_token_request(
                request.match_info["provider"],
                OUTCOMES["unauthenticated"],
                time.perf_counter() - started,
            )
        return unauthenticated("send Authorization: Bearer with a client's token")
    request[CALLER] = caller
    if _bulk_import(request, caller):
        request = request.clone(client_max_size=BULK_BODY_BYTES)
    return await handler(request)


def _bulk_import(request: web.Request, caller: Caller) -> bool:
    """Whether this is an admin's bulk import, which may send up to BULK_BODY_BYTES."""
    return (
        caller.admin
        and request.method == "POST"
        and request.path == "/v1/grants"
        and request.content_type == handlers.NDJSON
    )


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as problem+json; unexpected ones are logged, never echoed."""
    try:
        return await handler(request)
    except BrokerError as exc:
        response = problem_for(exc)
        if response.status >= 500 and response.status != 503:
            # The answer says "see its log": say it there. Broker errors carry no secrets.
            log.error(
                "request_failed",
                method=request.method,
                path=request.path,
                error=str(exc),
                kind=type(exc).__name__,
            )
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status, "bad_request"
        )
        # RFC 9110 requires Allow on a 405; keep it when the error becomes a problem.
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem(exc.status, code, exc.reason, exc.text or exc.reason, allow)
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        return problem(500, "internal_error", "Internal error", "the broker failed; see its log")


def build_app(
    *,
    service: GrantService,
    logins: LoginService,
    metrics: Metrics,
    policy: Policy,
    clock: Callable[[], datetime],
    readiness: Callable[[], Awaitable[list[str]]],
    held_per_caller: int = MAX_HELD_PER_CALLER,
) -> web.Application:
    """The API application; the same one serves the Unix socket and the TCP listener."""
    app = web.Application(middlewares=[problems, identify], client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = service
    app[LOGINS] = logins
    app[METRICS] = metrics
    app[POLICY] = policy
    app[CLOCK] = clock
    app[READINESS] = readiness
    app[PEERS] = weakref.WeakKeyDictionary()
    app[WATCHES] = watches = Watches(held_per_caller)
    unsubscribe = service.subscribe(watches.publish)
    app.on_shutdown.append(watches.close)  # answers held requests before the drain

    async def stop_watching(_app: web.Application) -> None:
        unsubscribe()

    app.on_cleanup.append(stop_watching)
    app.router.add_get("/v1/tokens/{provider}/{user}", handlers.get_token, name=_TOKEN_ROUTE_NAME)
    app.router.add_get("/v1/grants", handlers.list_grants)
    app.router.add_post("/v1/grants", handlers.import_grant)
    app.router.add_get("/v1/grants/{provider}/{user}", handlers.get_grant)
    app.router.add_delete("/v1/grants/{provider}/{user}", handlers.revoke_grant)
    app.router.add_post("/v1/grants/{provider}/{user}/refresh", handlers.refresh_grant)
    app.router.add_post("/v1/logins", handlers.start_login)
    app.router.add_get("/v1/logins/{login_id}", handlers.login_status)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    fast = app[FAST] = FastTokens(app, app[PEERS])
    app[FRONT] = fast.wrap
    return app


def build_metrics_app(metrics: Metrics) -> web.Application:
    """The app for the metrics TCP listener: /metrics and /healthz only."""
    app = web.Application(middlewares=[problems])
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.router.add_get("/healthz", handlers.healthz)
    return app
