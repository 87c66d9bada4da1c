"""The baseline: a bare aiohttp handler on a Unix socket, answering what the daemon answers.

It serves `GET /v1/tokens/{provider}/{user}` with a fixed body of the same size as the daemon's
token response and the same headers (taken from a real response of the daemon in the same
run, so a header the daemon adds later is mirrored too), the way the daemon runs aiohttp
(AppRunner, no access log, on uvloop when it is installed, as `token-broker serve` is). What
it lacks is everything the broker does per request: peer credentials, access control, the
cache lookup, metrics, JSON encoding.

Usage: python -m bench.bare_server SOCKET SPEC_JSON, where SPEC_JSON holds
{"body_size": N, "headers": {name: value}}. The socket gets mode 0660, as the daemon's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from broker.cli.local import run_loop

# Framing headers aiohttp sets by itself for every response.
FRAMING = frozenset({"content-length", "date", "server", "connection", "keep-alive"})


def mirrored_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a response that the bare handler repeats (all but the framing ones)."""
    return {name: value for name, value in headers.items() if name.lower() not in FRAMING}


def write_spec(path: Path, body_size: int, headers: Mapping[str, str]) -> None:
    """The spec file for a bare handler mirroring a response with these headers and size."""
    spec = {"body_size": body_size, "headers": mirrored_headers(headers)}
    path.write_text(json.dumps(spec))


def body_of_size(size: int) -> bytes:
    """A JSON object exactly `size` bytes long."""
    shell = b'{"access_token": ""}'
    if size < len(shell):
        raise ValueError(f"a token body of {size} bytes is too small to mirror")
    return b'{"access_token": "' + b"x" * (size - len(shell)) + b'"}'


async def serve(path: Path, body_size: int, headers: Mapping[str, str]) -> None:
    """Serve until SIGTERM."""
    body = body_of_size(body_size)

    async def token(_request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/tokens/{provider}/{user}", token)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # The socket is born 0660, as the daemon's: a client of another uid may connect at once.
    os.umask(0o117)
    await web.UnixSite(runner, str(path)).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    """Serve on the socket path given as the first argument, mirroring the spec file."""
    socket_path, spec_path = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads(spec_path.read_text())
    headers = {str(name): str(value) for name, value in spec["headers"].items()}
    # On the loop `token-broker serve` runs on (uvloop when it is installed).
    run_loop(serve(socket_path, int(spec["body_size"]), headers), fast_loop=True)


if __name__ == "__main__":
    main()
