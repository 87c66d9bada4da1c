"""Serving an application: the runner options every listener shares.

The daemon builds its listeners through `start_runner`, so connection-level limits (how big a
request may be, how long a client may take to send it) are set in one place.
"""

from __future__ import annotations

import contextlib

from aiohttp import web

SHUTDOWN_TIMEOUT = 10.0  # seconds in-flight requests get to finish after SIGTERM


async def start_runner(stack: contextlib.AsyncExitStack, app: web.Application) -> web.AppRunner:
    """A set-up runner for `app`, cleaned up (in-flight requests drained) when `stack` closes."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)  # drains in-flight requests, up to the timeout
    return runner
