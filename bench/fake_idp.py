"""A fast in-memory token endpoint with strict refresh-token rotation, on 127.0.0.1.

It answers `grant_type=refresh_token` the way a rotating provider does: each refresh token
is good once; spending it returns a new access token and a new refresh token; presenting a
spent one again is answered `invalid_grant` and counted as reuse (the benchmark reports that
count, which must stay 0). A refresh token it has not seen before is accepted once if it has
the benchmark's prefix, so grants seeded straight into the store can rotate. Access tokens
live an hour, so no grant comes due twice during a benchmark.

`GET /stats` reports how many rotations it made and when the first request arrived and the
last answer left (CLOCK_MONOTONIC, which the benchmark shares), so throughput is timed by the
provider itself. Usage: python -m bench.fake_idp PORT_FILE (writes its port there once
listening; stops on SIGTERM).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from pathlib import Path

from aiohttp import web

from bench.tokens import PREFIX, fake_token

ACCESS_LIFETIME = 3600
_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class RotatingProvider:
    """The token endpoint's state: live and spent refresh tokens, and the counts."""

    def __init__(self) -> None:
        self.live: set[str] = set()
        self.spent: set[str] = set()
        self.rotations = 0
        self.reuses = 0
        self.rejected = 0
        self.first: float | None = None
        self.last: float | None = None

    async def token(self, request: web.Request) -> web.Response:
        """POST /token: rotate a refresh token."""
        now = time.monotonic()
        if self.first is None:
            self.first = now
        form = await request.post()
        presented = form.get("refresh_token")
        if form.get("grant_type") != "refresh_token" or not isinstance(presented, str):
            self.rejected += 1
            return _error(400, "unsupported_grant_type")
        if presented in self.spent:
            self.reuses += 1
            return _error(400, "invalid_grant")
        if presented not in self.live and not presented.startswith(PREFIX):
            self.rejected += 1
            return _error(400, "invalid_grant")
        self.live.discard(presented)
        self.spent.add(presented)
        fresh = fake_token()
        self.live.add(fresh)
        self.rotations += 1
        body = {
            "access_token": fake_token(),
            "token_type": "Bearer",
            "expires_in": ACCESS_LIFETIME,
            "refresh_token": fresh,
            "scope": "profile",
        }
        self.last = time.monotonic()
        return web.json_response(body, headers=_HEADERS)

    async def stats(self, _request: web.Request) -> web.Response:
        """GET /stats: counts and the first and last instants (no token values)."""
        return web.json_response(
            {
                "rotations": self.rotations,
                "reuses": self.reuses,
                "rejected": self.rejected,
                "first": self.first,
                "last": self.last,
            }
        )


def _error(status: int, code: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"error": code}).encode(),
        content_type="application/json",
        headers=_HEADERS,
    )


async def serve(port_file: Path) -> None:
    """Listen on 127.0.0.1 (a free port, written to `port_file`) until SIGTERM."""
    provider = RotatingProvider()
    app = web.Application()
    app.router.add_post("/token", provider.token)
    app.router.add_get("/stats", provider.stats)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    await web.SockSite(runner, listener, backlog=1024).start()
    partial = port_file.with_suffix(".partial")
    partial.write_text(str(port))
    partial.rename(port_file)  # appears whole: the benchmark polls for it
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    """Serve, writing the port to the file named by the only argument."""
    asyncio.run(serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
