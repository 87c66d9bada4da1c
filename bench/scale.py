"""Scale: what a daemon with many grants costs to start, to keep in memory and to keep idle.

For each size the store is seeded (long-lived access tokens, so nothing comes due), then the
daemon is exec'd and timed until `/readyz` answers 200. After a settling pause its resident
memory (VmRSS) is read, its CPU time (utime + stime from /proc/PID/stat) is taken over an idle
window, and finally h2load measures token requests at 16 connections spread over every grant.
The last table holds the largest size against the targets, the p99 against the 1k figure.

    python -m bench.scale [--sizes 0,1000,10000,100000] [--idle-seconds 30]
                          [--requests 50000] [--smoke] [--json FILE]
"""

from __future__ import annotations

import contextlib
import http.client
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import h2load
from bench.identity import ClientIdentity, token_client
from bench.install import PROVIDER, Workspace, daemon, install, workspace
from bench.machine import busy_seconds
from bench.options import counts, parser
from bench.proc import cpu_seconds, rss_mib
from bench.report import Report, Table, verdict
from bench.seed import Lifetimes, seed
from tests.daemon import request

READY_TIMEOUT = 300.0
READY_POLL = 0.01
CONNECTIONS = 16
WARM_UP_REQUESTS = 5000
TARGET_READY_S = 5.0
TARGET_RSS_MIB = 250.0
TARGET_IDLE_CPU = 0.005
TARGET_P99_GROWTH = 0.10
REFERENCE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class Footprint:
    """One size: start-up, memory, idle cost and token latency."""

    grants: int
    seed_s: float
    ready_s: float
    rss_ready_mib: float
    rss_idle_mib: float
    idle_cpu: float  # share of one core
    rps: float | None
    p50_ms: float | None
    p99_ms: float | None
    others_cpu: float | None  # share of one core others took during the token run


def measure(
    ws: Workspace, size: int, client: ClientIdentity, *, settle: float, idle: float, requests: int
) -> Footprint:
    """Seed `size` grants, start the daemon, and measure it."""
    installation = install(ws.directory(f"scale-{size}"))
    installation.write_config(client=client)
    started = time.monotonic()
    users = seed(
        installation.store_url, installation.keyring, size, PROVIDER, Lifetimes.long_lived()
    )
    seeded = time.monotonic() - started
    uris = ws.root / f"uris-{size}.txt"
    h2load.write_uris(uris, ((PROVIDER, u) for u in users))
    out = ws.directory(f"client-{size}")
    client.give(out)
    load = None
    started = time.monotonic()
    with daemon(installation, ws.logs, f"scale-{size}", wait=False) as process:
        ready = _until_ready(installation.socket, started, process.process.poll)
        time.sleep(settle)
        rss_ready = rss_mib(process.pid)
        cpu = cpu_seconds(process.pid)
        time.sleep(idle)
        idle_cpu = (cpu_seconds(process.pid) - cpu) / idle
        rss_idle = rss_mib(process.pid)
        others = None
        if size:
            for n in (min(requests, WARM_UP_REQUESTS), requests):  # warm-up, then measured
                cpu, busy = cpu_seconds(process.pid), busy_seconds()
                load = h2load.run(
                    installation.socket,
                    uris,
                    requests=n,
                    connections=CONNECTIONS,
                    log_file=out / "h2load.log",
                    client=client,
                )
                ours = cpu_seconds(process.pid) - cpu + load.client_cpu_s
                others = max(0.0, busy_seconds() - busy - ours) / load.wall_s
    return Footprint(
        grants=size,
        seed_s=seeded,
        ready_s=ready,
        rss_ready_mib=rss_ready,
        rss_idle_mib=rss_idle,
        idle_cpu=idle_cpu,
        rps=None if load is None else load.rps,
        p50_ms=None if load is None else load.p50_ms,
        p99_ms=None if load is None else load.p99_ms,
        others_cpu=others,
    )


def _until_ready(socket: Path, started: float, exited: Callable[[], int | None]) -> float:
    """Seconds from `started` until GET /readyz answers 200."""
    while time.monotonic() - started < READY_TIMEOUT:
        if exited() is not None:
            raise RuntimeError("the daemon exited while starting; see its log")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(socket, "GET", "/readyz", timeout=5.0).status == 200:
                return time.monotonic() - started
        time.sleep(READY_POLL)
    raise RuntimeError(f"/readyz did not answer 200 within {READY_TIMEOUT:.0f} s")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the scale benchmark and print its tables."""
    p = parser("bench.scale", __doc__)
    p.add_argument(
        "--sizes",
        type=counts,
        default=[0, 1000, 10_000, 100_000],
        metavar="LIST",
        help="grant counts (default 0,1000,10000,100000)",
    )
    p.add_argument("--idle-seconds", type=float, default=30.0, help="idle window (default 30)")
    p.add_argument("--settle-seconds", type=float, default=5.0, help="pause after ready (5)")
    p.add_argument("--requests", type=int, default=50_000, help="token requests per size")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.idle_seconds, args.settle_seconds, args.requests = [0, 20], 0.5, 0.1, 300
    h2load.h2load_path()
    client = token_client()
    with workspace(args.log_dir, args.keep) as ws:
        report = Report.start("scale", ws.root)
        footprints = [
            measure(
                ws,
                size,
                client,
                settle=args.settle_seconds,
                idle=args.idle_seconds,
                requests=args.requests,
            )
            for size in args.sizes
        ]
        report.results = {"footprints": [asdict(f) for f in footprints]}
        report.tables = _tables(footprints, args.idle_seconds, args.requests, client)
        report.finish()
    report.emit(args.json)


def _tables(
    footprints: list[Footprint], idle: float, requests: int, client: ClientIdentity
) -> list[Table]:
    sizes = Table(
        "Scale: start-up, memory, idle cost and token latency by grant count",
        [
            "grants",
            "ready s",
            "RSS MiB",
            "RSS idle MiB",
            "idle CPU",
            "req/s",
            "p50 ms",
            "p99 ms",
            "others' CPU",
        ],
    )
    for f in footprints:
        sizes.add(
            f.grants,
            f.ready_s,
            f.rss_ready_mib,
            f.rss_idle_mib,
            f"{f.idle_cpu:.1%}",
            f.rps,
            f.p50_ms,
            f.p99_ms,
            None if f.others_cpu is None else f"{f.others_cpu:.0%}",
        )
    sizes.notes = [
        "ready: exec of `token-broker serve` to the first 200 from /readyz",
        f"RSS: VmRSS after ready and a settling pause, and again after {idle:g} s idle",
        f"idle CPU: utime + stime over {idle:g} s with no requests, as a share of one core",
        f"tokens: {requests:,} GETs at {CONNECTIONS} connections with h2load over every grant; "
        "others': what processes outside the benchmark took meanwhile (the noise)",
        client.describe(),
    ]
    largest = max(footprints, key=lambda f: f.grants)
    reference = next((f for f in footprints if f.grants == REFERENCE_SIZE), None)
    targets = Table(
        f"Scale targets at {largest.grants:,} grants",
        ["figure", "measured", "target", "met"],
    )
    targets.add(
        "ready s",
        largest.ready_s,
        f"< {TARGET_READY_S:g}",
        verdict(largest.ready_s < TARGET_READY_S),
    )
    rss = max(largest.rss_ready_mib, largest.rss_idle_mib)
    targets.add("RSS MiB", rss, f"< {TARGET_RSS_MIB:g}", verdict(rss < TARGET_RSS_MIB))
    targets.add(
        "idle CPU",
        f"{largest.idle_cpu:.2%}",
        f"< {TARGET_IDLE_CPU:.1%}",
        verdict(largest.idle_cpu < TARGET_IDLE_CPU),
    )
    if reference is not None and reference.p99_ms and largest.p99_ms:
        limit = reference.p99_ms * (1 + TARGET_P99_GROWTH)
        targets.add(
            "token p99 ms",
            largest.p99_ms,
            f"<= {limit:.2f} (1k p99 + 10%)",
            verdict(largest.p99_ms <= limit),
        )
    else:
        targets.add(
            "token p99 ms", largest.p99_ms, f"within 10% of the {REFERENCE_SIZE:,} figure", None
        )
    return [sizes, targets]


if __name__ == "__main__":
    main()
