"""Serving an application: the runner options every listener shares.

The daemon builds its listeners through `start_runner`, so connection-level limits (how big a
request may be, how long a client may take to send it) are set in one place:

- the request head: line and header sizes and the number of headers are capped by aiohttp's
  parser; past them (or on malformed HTTP) the client gets a 400 problem and the connection
  closes. aiohttp's own answer would be plain text quoting the start of the offending line,
  and its log would quote it too, which for an Authorization header is part of a token;
- a connection must deliver a complete request head within `idle_timeout` of opening, or of
  its previous response. aiohttp's keep-alive timer does this: it is armed at those two
  moments and is not pushed back by bytes that arrive, so a head trickled a byte at a time
  (slowloris) is cut just like a connection that sits idle;
- the body must arrive within `body_timeout` once the head has: `start_runner` adds an
  innermost middleware that reads it under that deadline (aiohttp has no such timer) and
  otherwise answers 408 and closes. Size (`client_max_size`) stays the application's own;
- nothing limits how long a handler takes to answer: a token request may wait on the
  identity provider. Neither timer runs while a handler does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from broker.api.problems import problem

SHUTDOWN_TIMEOUT = 10.0  # seconds in-flight requests get to finish after SIGTERM
IDLE_TIMEOUT = 15.0  # seconds a connection may go without a complete request head
BODY_TIMEOUT = 10.0  # seconds a request's body may take to arrive after its head
MAX_LINE_SIZE = 8190  # bytes in the request line (method, target, version)
MAX_FIELD_SIZE = 8190  # bytes in one header line
MAX_HEADERS = 64  # header lines in one request
log = structlog.get_logger("broker.api")
RequestHandlerFn = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
# What the runner puts in front of the application's own request handler (see broker.api.fast).
FRONT: web.AppKey[Callable[[RequestHandlerFn], RequestHandlerFn]] = web.AppKey("front")


@dataclass(frozen=True, slots=True)
class Limits:
    """How much a client may send and how slowly; the defaults are the daemon's."""

    idle_timeout: float = IDLE_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_line_size: int = MAX_LINE_SIZE
    max_field_size: int = MAX_FIELD_SIZE
    max_headers: int = MAX_HEADERS


async def start_runner(
    stack: contextlib.AsyncExitStack, app: web.Application, limits: Limits | None = None
) -> web.AppRunner:
    """A set-up runner for `app`, cleaned up (in-flight requests drained) when `stack` closes."""
    limits = limits or Limits()
    app.middlewares.append(body_deadline(limits.body_timeout))
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        keepalive_timeout=limits.idle_timeout,
        # A body the handler left unread is drained (so the client sees the answer) no
        # longer than a body may take to arrive.
        lingering_time=limits.body_timeout,
        max_line_size=limits.max_line_size,
        max_field_size=limits.max_field_size,
        max_headers=limits.max_headers,
    )
    await runner.setup()
    assert runner.server is not None
    # aiohttp offers no hook for how a connection answers what it cannot parse; its factory's
    # class is swapped for one that makes connections answering with a problem. Guarded by
    # tests/test_openapi.py::test_a_request_head_over_the_limits_is_a_400_problem.
    runner.server.__class__ = _ProblemServer
    front = app.get(FRONT)
    if front is not None:
        runner.server.request_handler = front(runner.server.request_handler)
    stack.push_async_callback(runner.cleanup)  # drains in-flight requests, up to the timeout
    return runner


def body_deadline(seconds: float) -> Middleware:
    """A middleware that reads the request body within `seconds`, or answers 408 and closes."""

    @web.middleware
    async def read_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(seconds):
                    await request.read()  # kept by the request: handlers read it again for free
            except TimeoutError:
                return await _too_slow(request, seconds)
        return await handler(request)

    return read_body


async def _too_slow(request: web.Request, seconds: float) -> web.StreamResponse:
    response = problem(
        408,
        "request_timeout",
        "Request timeout",
        f"the request body did not arrive within {seconds:g} s",
    )
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    # Close now rather than drain the rest of a body that is known to trickle.
    request.protocol.force_close()
    return response


def on_disconnect(request: web.BaseRequest, callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` once if the client's connection is lost; returns the function that
    cancels it. aiohttp does not cancel a handler whose client went away, so a handler that
    waits a long time for something else learns of it here (on connections this module
    made; elsewhere the callback is never called)."""
    protocol = request.protocol
    if not isinstance(protocol, _ProblemRequestHandler):
        return _nothing
    protocol.lost_callbacks.append(callback)

    def cancel() -> None:
        with contextlib.suppress(ValueError):
            protocol.lost_callbacks.remove(callback)

    return cancel


def _nothing() -> None:
    """Nothing to cancel."""


class _ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse with a problem."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost_callbacks: list[Callable[[], None]] = []

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        callbacks, self.lost_callbacks = self.lost_callbacks, []
        for callback in callbacks:
            callback()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,  # noqa: ARG002 - aiohttp's signature; it quotes the request
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; no error answer can follow it")
        # Neither aiohttp's message nor the exception's is logged: both quote request bytes.
        log.warning("unparsable_request", status=status, error=type(exc).__name__)
        if status < 500:
            response = problem(
                400,
                "bad_request",
                "Bad request",
                "the request is not well-formed HTTP or its head is over the limits: request "
                f"line and header lines up to {MAX_LINE_SIZE} bytes, up to {MAX_HEADERS} headers",
            )
        else:
            response = problem(
                500, "internal_error", "Internal error", "the broker failed; see its log"
            )
        response.force_close()
        return response


class _ProblemServer(web.Server):
    """The protocol factory of a runner, making `_ProblemRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)
