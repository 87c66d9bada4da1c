"""Serving: the daemon's GET /v1/tokens against a bare aiohttp handler, driven by h2load.

The daemon is the real `token-broker serve` with its grants seeded in the store, access
control through a non-admin `[[clients]]` entry (see bench.identity), metrics and default
logging on. The bare handler answers a body of the same size with the same headers. Both run
on Unix sockets in the same run, and rounds alternate between them (and swap who goes first),
so machine noise hits both alike. On a shared machine, each run also records the CPU that
processes outside the benchmark took meanwhile; the tables give medians over the quiet runs
(all runs when none was quiet), the ratio of throughputs, and each figure beside its target.

    python -m bench.serving [--grants 1000] [--requests 30000] [--connections 1,16,64]
                            [--rounds 7] [--quiet 0.25] [--smoke] [--json FILE]
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import h2load
from bench.bare_server import mirrored_headers, write_spec
from bench.h2load import LoadResult
from bench.identity import ClientIdentity, token_client
from bench.install import PROVIDER, daemon, install, workspace
from bench.machine import busy_seconds
from bench.options import parser, positive_ints
from bench.proc import cpu_seconds
from bench.report import Report, Table, verdict
from bench.seed import Lifetimes, seed, user_name
from bench.servers import python_server
from tests.daemon import request

TARGET_RATIO = 0.85
TARGET_P99_MS = 1.0
TARGET_P99_CONNECTIONS = 16
WARM_UP_REQUESTS = 5000
QUIET = 0.25  # share of one core other processes may take during a run that counts as quiet
SERVERS = ("broker", "bare")


@dataclass(frozen=True, slots=True)
class Run:
    """One h2load run against one server, and who used the CPU meanwhile."""

    server: str
    load: LoadResult
    server_cpu: float  # share of one core
    others_cpu: float  # share of one core used by processes outside the benchmark

    def as_dict(self) -> dict[str, object]:
        """For --json output."""
        return {
            "server": self.server,
            "server_cpu": self.server_cpu,
            "others_cpu": self.others_cpu,
            **self.load.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class Target:
    """Where h2load points: a socket, and the pid whose CPU it should cost."""

    socket: Path
    pid: int


def measure(
    name: str,
    target: Target,
    *,
    uris: Path,
    requests: int,
    connections: int,
    log_file: Path,
    client: ClientIdentity,
) -> Run:
    """One h2load run, with the server's and everyone else's CPU use during it."""
    cpu_before, busy_before = cpu_seconds(target.pid), busy_seconds()
    load = h2load.run(
        target.socket,
        uris,
        requests=requests,
        connections=connections,
        log_file=log_file,
        client=client,
    )
    server = cpu_seconds(target.pid) - cpu_before
    others = busy_seconds() - busy_before - server - load.client_cpu_s
    return Run(name, load, server / load.wall_s, max(0.0, others) / load.wall_s)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the serving benchmark and print its tables."""
    p = parser("bench.serving", __doc__)
    p.add_argument("--grants", type=int, default=1000, help="grants in the store (default 1000)")
    p.add_argument("--requests", type=int, default=30_000, help="requests per h2load run")
    p.add_argument("--connections", type=positive_ints, default=[1, 16, 64], metavar="LIST")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    p.add_argument(
        "--quiet",
        type=float,
        default=QUIET,
        metavar="SHARE",
        help="a run is quiet when other processes took at most this share of a core "
        f"meanwhile; medians use quiet runs where there are any (default {QUIET})",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.grants, args.requests, args.rounds = 20, 300, 1
    h2load.h2load_path()
    client = token_client()
    with workspace(args.log_dir, args.keep) as ws:
        report = Report.start("serving", ws.root)
        installation = install(ws.directory("broker"))
        installation.write_config(client=client)
        users = seed(
            installation.store_url,
            installation.keyring,
            args.grants,
            PROVIDER,
            Lifetimes.long_lived(),
        )
        uris = ws.root / "uris.txt"
        h2load.write_uris(uris, ((PROVIDER, u) for u in users))
        out = ws.directory("client")
        client.give(out)
        runs: list[Run] = []
        with daemon(installation, ws.logs, "serving") as broker:
            sample = request(installation.socket, "GET", f"/v1/tokens/{PROVIDER}/{user_name(0)}")
            if sample.status != 200:
                raise RuntimeError(f"the daemon answered {sample.status} to a token request")
            spec = ws.root / "bare-spec.json"
            write_spec(spec, len(sample.body), sample.headers)
            bare_socket = ws.root / "bare.sock"
            with python_server(
                "bench.bare_server",
                [str(bare_socket), str(spec)],
                ready=bare_socket,
                log=ws.logs / "bare.stderr.log",
            ) as bare:
                targets = {
                    "broker": Target(installation.socket, broker.pid),
                    "bare": Target(bare_socket, bare.pid),
                }

                def one(name: str, requests: int, connections: int) -> Run:
                    log_file = out / f"{name}-{connections}.log"
                    return measure(
                        name,
                        targets[name],
                        uris=uris,
                        requests=requests,
                        connections=connections,
                        log_file=log_file,
                        client=client,
                    )

                for name in SERVERS:  # warm up: first connections, code paths, allocator
                    one(name, min(args.requests, WARM_UP_REQUESTS), 16)
                runs = _rounds(args.rounds, args.connections, args.requests, one)
        report.results = {
            "grants": args.grants,
            "requests_per_run": args.requests,
            "rounds": args.rounds,
            "client": client.describe(),
            "body_bytes": len(sample.body),
            "headers": sorted(mirrored_headers(sample.headers)),
            "runs": [r.as_dict() for r in runs],
        }
        notes = [
            f"{args.grants:,} grants; {args.requests:,} requests per run, each connection walking "
            "the URI list from its head (grants asked for: "
            + ", ".join(
                f"{min(args.grants, args.requests // c):,} at {c}" for c in args.connections
            )
            + f"); {args.rounds} alternating rounds",
            client.describe(),
            f"bare handler: the same {len(sample.body)}-byte body size and the same headers "
            f"({', '.join(sorted(mirrored_headers(sample.headers)))}) as the daemon's answer",
            f"event loop of both servers: {_event_loop()}",
        ]
        report.tables = _tables(runs, notes, args.quiet)
        report.finish()
    report.emit(args.json)


def _rounds(
    rounds: int,
    connection_counts: list[int],
    requests: int,
    one: Callable[[str, int, int], Run],
) -> list[Run]:
    runs = []
    for round_ in range(rounds):
        for connections in connection_counts:
            # Swap who goes first each round, so a drifting machine favours neither.
            order = SERVERS if round_ % 2 == 0 else tuple(reversed(SERVERS))
            for name in order:
                runs.append(one(name, requests, connections))
                time.sleep(0.2)  # let the previous server's sockets close
    return runs


def _chosen(runs: list[Run], server: str, connections: int, quiet: float) -> list[Run]:
    """This server's runs at this many connections: the quiet ones, or all if none was."""
    mine = [r for r in runs if r.server == server and r.load.connections == connections]
    return [r for r in mine if r.others_cpu <= quiet] or mine


def _median(chosen: list[Run], pick: Callable[[Run], float]) -> float:
    return statistics.median(pick(r) for r in chosen)


def _event_loop() -> str:
    """The loop the daemon and the bare handler run on: uvloop when it is installed."""
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def _tables(runs: list[Run], notes: list[str], quiet: float) -> list[Table]:
    connection_counts = sorted({r.load.connections for r in runs})
    rounds = max(
        len([r for r in runs if r.server == "broker" and r.load.connections == c])
        for c in connection_counts
    )
    throughput = Table(
        "Serving throughput: broker vs bare aiohttp handler (h2load, HTTP/1.1, Unix socket)",
        [
            "connections",
            "broker req/s",
            "bare req/s",
            "ratio",
            "target",
            "met",
            "broker CPU",
            "bare CPU",
            "h2load CPU",
            "others' CPU",
            "quiet runs",
        ],
    )
    latency = Table(
        "Serving latency (ms, from h2load's per-request log)",
        ["connections", "broker p50", "broker p99", "bare p50", "bare p99", "target p99", "met"],
    )
    for c in connection_counts:
        broker, bare = _chosen(runs, "broker", c, quiet), _chosen(runs, "bare", c, quiet)
        ratio = _median(broker, lambda r: r.load.rps) / _median(bare, lambda r: r.load.rps)
        calm = [len([r for r in group if r.others_cpu <= quiet]) for group in (broker, bare)]
        throughput.add(
            c,
            _median(broker, lambda r: r.load.rps),
            _median(bare, lambda r: r.load.rps),
            ratio,
            f">= {TARGET_RATIO}",
            verdict(ratio >= TARGET_RATIO),
            f"{_median(broker, lambda r: r.server_cpu):.0%}",
            f"{_median(bare, lambda r: r.server_cpu):.0%}",
            f"{_median(broker, lambda r: r.load.client_cpu_s / r.load.wall_s):.0%}",
            f"{_median(broker + bare, lambda r: r.others_cpu):.0%}",
            f"{calm[0]}/{rounds}, {calm[1]}/{rounds}",
        )
        broker_p99 = _median(broker, lambda r: r.load.p99_ms)
        has_target = c == TARGET_P99_CONNECTIONS
        latency.add(
            c,
            _median(broker, lambda r: r.load.p50_ms),
            broker_p99,
            _median(bare, lambda r: r.load.p50_ms),
            _median(bare, lambda r: r.load.p99_ms),
            f"< {TARGET_P99_MS:g}" if has_target else None,
            verdict(broker_p99 < TARGET_P99_MS) if has_target else None,
        )
    throughput.notes = [
        *notes,
        "CPU columns: median share of one core used by each server during its runs, and by "
        "h2load during the broker's runs (well below 100%: the client is not the bottleneck)",
        "others' CPU: median share of one core that processes outside the benchmark took "
        "during the runs used (the noise; 0% on a quiet machine)",
        f"quiet runs (broker, bare): runs during which others took at most {quiet:.0%} of a "
        "core; medians are over those, or over every run when none was quiet",
    ]
    return [throughput, latency]


if __name__ == "__main__":
    main()
