"""Token-path benchmark: the broker's GET /v1/tokens against a bare aiohttp handler.

Both servers run as separate processes on Unix sockets and are driven by the same client with
the same concurrency, so the difference is what the broker adds per request: peer credentials,
policy, the cache lookup, metrics and JSON. Also reports the daemon's resident memory with the
grants loaded. Usage: python -m bench.token_path [--grants N] [--requests N] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

CONFIG = """
[server]
socket = "broker.sock"
socket_mode = "0600"
callback = ""
metrics = ""
[store]
url = "sqlite:///broker.db"
key_file = "keys"
[providers.techniek]
issuer = "https://idp.example.nl/o"
client_id = "bench"
scopes = ["openid", "profile", "FGO", "FGOWS"]
redirect_uri = "http://localhost:8000/oauth-callback/"
"""


@contextmanager
def process(args: list[str], socket_path: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process, wait for its socket, and stop it by pid afterwards."""
    with log.open("wb") as err:
        proc = subprocess.Popen(args, stderr=err, stdout=err)
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[2]} did not start; see {log}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def load(socket_path: Path, users: int, requests: int, concurrency: int) -> dict[str, float]:
    """Send `requests` GETs with `concurrency` in flight; throughput and latency percentiles."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(worker_id: int) -> None:
            for i in range(worker_id, requests, concurrency):
                url = f"http://broker/v1/tokens/techniek/user-{i % users:05d}"
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                latencies.append(time.perf_counter() - started)
                statuses[response.status] = statuses.get(response.status, 0) + 1

        await asyncio.gather(*(worker(w) for w in range(min(concurrency, 50))))  # warm-up
        latencies.clear()
        statuses.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected statuses {statuses}")
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
    }


def import_grants(socket_path: Path, users: int) -> None:
    """Import `users` grants through the API, as an operator would."""

    async def run() -> None:
        connector = aiohttp.UnixConnector(path=str(socket_path), limit=16)
        async with aiohttp.ClientSession(connector=connector) as session:
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> None:
                body = {
                    "provider": "techniek",
                    "user": f"user-{i:05d}",
                    "refresh_token": secrets.token_urlsafe(32),
                    "access_token": secrets.token_urlsafe(32),
                    "expires_in": 36000,
                }
                async with sem, session.post("http://broker/v1/grants", json=body) as response:
                    if response.status != 201:
                        raise RuntimeError(f"import failed: {response.status}")

            await asyncio.gather(*(one(i) for i in range(users)))

    asyncio.run(run())


def main() -> None:
    """Run both servers, drive them, print a comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grants", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    python = sys.executable
    runs: dict[str, list[dict[str, float]]] = {"broker": [], "bare aiohttp": []}
    with tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp:
        root = Path(tmp)
        (root / "config.toml").write_text(CONFIG)
        config = ["-c", str(root / "config.toml")]
        subprocess.run(
            [python, "-m", "broker", *config, "keys", "generate"], check=True, capture_output=True
        )
        sockets = {"broker": root / "broker.sock", "bare aiohttp": root / "bare.sock"}
        daemon_args = [python, "-m", "broker", *config, "serve"]
        bare_args = [python, "-m", "bench.bare_server", str(sockets["bare aiohttp"])]
        with (
            process(daemon_args, sockets["broker"], root / "broker.log") as daemon,
            process(bare_args, sockets["bare aiohttp"], root / "bare.log"),
        ):
            rss_empty = rss_kib(daemon.pid)
            import_grants(sockets["broker"], args.grants)
            for _round in range(args.rounds):  # alternate, so drift hits both alike
                for name, path in sockets.items():
                    runs[name].append(
                        asyncio.run(load(path, args.grants, args.requests, args.concurrency))
                    )
            rss_loaded = rss_kib(daemon.pid)
    results = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for name, rs in runs.items()
    }
    print(
        f"token path: {args.requests} GETs, {args.concurrency} in flight, "
        f"{args.grants} grants, {os.cpu_count()} cores, one Python client, "
        f"median of {args.rounds} alternating rounds"
    )
    print(f"{'server':14} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in results.items():
        print(f"{name:14} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    ratio = results["broker"]["rps"] / results["bare aiohttp"]["rps"]
    print(f"broker throughput is {ratio:.0%} of the bare handler's")
    print(f"daemon RSS: {rss_empty} KiB empty, {rss_loaded} KiB with {args.grants} grants")
    print(json.dumps({"results": results, "rss_kib": [rss_empty, rss_loaded]}))


if __name__ == "__main__":
    main()
