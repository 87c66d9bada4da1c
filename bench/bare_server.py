"""The baseline: a bare aiohttp handler on a Unix socket returning a token-shaped JSON body."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from aiohttp import web

BODY = json.dumps(
    {
        "access_token": "x" * 43,
        "token_type": "Bearer",
        "expires_in": 3600,
        "expires_at": "2026-01-01T00:00:00Z",
        "scope": "openid profile FGO FGOWS",
        "provider": "techniek",
        "user": "user-00001",
    }
).encode()


async def token(_request: web.Request) -> web.Response:
    """Always the same body, with the same headers the broker sends."""
    return web.Response(
        body=BODY,
        content_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def serve(path: str) -> None:
    """Serve the way the daemon does (AppRunner, no access log) until SIGTERM."""
    app = web.Application()
    app.router.add_get("/v1/tokens/{provider}/{user}", token)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    """Serve on the socket path given as the only argument."""
    asyncio.run(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
