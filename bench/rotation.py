"""Rotation throughput: every grant due at once, against a fast rotating token endpoint.

The store is seeded with grants whose access tokens have expired, so the daemon starts with
all of them due. The provider is bench.fake_idp (in-memory, strict rotation, on 127.0.0.1),
configured with explicit endpoints and no issuer, so nothing is discovered. The benchmark
polls the store until every grant's generation has moved and reports rotations per second
from the provider's first refresh request to the last commit, the daemon's CPU time per
rotation, and the time from exec to the last commit; then checks that every grant moved
exactly one generation and that the provider saw no refresh token twice. Each store and
max_concurrency runs `--runs` times (3), the settings taking turns, each run on a store and a
provider of its own; the table gives the median of the runs and each run's rate, and the
target is judged on the median (one storm of 2,000 grants lasts about two seconds, and on a
shared host one run can meet a slow second). Beside it: the raw
single-row durable-commit rate of the same disk and the same PostgreSQL server
(bench.commit_rate), the ceiling the broker is measured against.

    python -m bench.rotation [--grants 2000] [--concurrency 8,32] [--stores sqlite,postgresql]
                             [--runs 3] [--postgres-url URL] [--smoke] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import func, select

from bench import commit_rate, pg
from bench.identity import token_client
from bench.install import PROVIDER, Installation, Workspace, daemon, install, workspace
from bench.machine import busy_seconds
from bench.options import parser, positive_ints
from bench.proc import cpu_seconds, family_cpu_seconds
from bench.report import Report, Table, verdict
from bench.seed import Lifetimes, generations, seed
from bench.servers import python_server
from broker.store.engine import create_engine
from broker.store.tables import grants

TARGET_RATE = 1000.0  # durable rotations per second
TARGET_STORE, TARGET_CONCURRENCY = "sqlite", 32
POLL_SECONDS = 0.025
STORES = ("sqlite", "postgresql")


@dataclass(frozen=True, slots=True)
class Storm:
    """One run: every grant rotated once."""

    store: str
    max_concurrency: int
    grants: int
    rate: float  # rotations/s from the first refresh request to the last commit
    cpu_ms: float  # daemon CPU per rotation, while rotating
    broker_cpu: float  # share of one core, while rotating
    idp_cpu: float  # share of one core, while rotating
    db_cpu: float | None  # PostgreSQL's share of one core, while rotating
    others_cpu: float  # share of one core taken by processes outside the benchmark
    exec_to_done_s: float


@dataclass(frozen=True, slots=True)
class Watched:
    """The processes whose CPU a storm costs: the daemon, the provider, the database server."""

    broker: int
    idp: int
    database: int | None  # PostgreSQL's postmaster; None for SQLite (inside the daemon)


@dataclass(frozen=True, slots=True)
class Sample:
    """The state of a rotation storm at one instant."""

    at: float
    moved: int
    broker_cpu: float
    idp_cpu: float
    db_cpu: float
    busy: float  # the whole machine's non-idle CPU seconds
    own_cpu: float  # this process's (the poller's)

    @classmethod
    def take(cls, moved: int, watched: Watched) -> Sample:
        """The state now, given how many grants have moved."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            time.monotonic(),
            moved,
            cpu_seconds(watched.broker),
            cpu_seconds(watched.idp),
            0.0 if watched.database is None else family_cpu_seconds(watched.database),
            busy_seconds(),
            usage.ru_utime + usage.ru_stime,
        )


async def _watch(
    store_url: str, grants_total: int, watched: Watched, deadline: float
) -> list[Sample]:
    """Sample the store until every grant's generation has moved; the samples."""
    engine = create_engine(store_url)
    query = select(func.count()).select_from(grants).where(grants.c.generation > 1)
    samples: list[Sample] = []
    try:
        async with engine.connect() as conn:
            while time.monotonic() < deadline:
                moved = int((await conn.execute(query)).scalar_one())
                await conn.rollback()  # a fresh snapshot next time
                samples.append(Sample.take(moved, watched))
                if moved >= grants_total:
                    return samples
                await asyncio.sleep(POLL_SECONDS)
    finally:
        await engine.dispose()
    got = samples[-1].moved if samples else 0
    raise RuntimeError(f"only {got} of {grants_total} grants rotated in the time allowed")


def _stats(port: int) -> dict[str, float | int | None]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
        stats: dict[str, float | int | None] = json.loads(response.read())
    return stats


def storm(
    ws: Workspace,
    name: str,
    *,
    store: str,
    store_url: str | None,
    grants_total: int,
    concurrency: int,
    database: int | None = None,
) -> Storm:
    """Seed, start the provider and the daemon, time the storm, check the outcome."""
    installation: Installation = install(ws.directory(name), store_url)
    port_file = ws.root / f"{name}.idp-port"
    with python_server(
        "bench.fake_idp", [str(port_file)], ready=port_file, log=ws.logs / f"{name}.idp.log"
    ) as idp:
        port = int(port_file.read_text())
        installation.write_config(
            client=token_client(), idp=f"http://127.0.0.1:{port}", max_concurrency=concurrency
        )
        seed(
            installation.store_url,
            installation.keyring,
            grants_total,
            PROVIDER,
            Lifetimes.all_due(),
        )
        timeout = max(120.0, grants_total / 5)
        started = time.monotonic()
        with daemon(installation, ws.logs, name, wait=False) as broker:
            samples = asyncio.run(
                _watch(
                    installation.store_url,
                    grants_total,
                    Watched(broker.pid, idp.pid, database),
                    started + timeout,
                )
            )
        stats = _stats(port)
    final = asyncio.run(generations(installation.store_url))
    if final != {2: grants_total}:
        raise RuntimeError(f"{name}: grants by generation {final}, expected all at 2")
    if stats["reuses"] or stats["rejected"] or stats["rotations"] != grants_total:
        raise RuntimeError(f"{name}: the provider saw {stats} for {grants_total} grants")
    first_request = float(stats["first"] or started)
    done = samples[-1]
    # CPU per rotation from the first sample that saw a commit: start-up costs excluded.
    begin = next((s for s in samples if s.moved > 0), samples[0])
    span = max(done.at - begin.at, 1e-9)
    rotated = max(done.moved - begin.moved, 1)
    return Storm(
        store=store,
        max_concurrency=concurrency,
        grants=grants_total,
        rate=grants_total / (done.at - first_request),
        cpu_ms=(done.broker_cpu - begin.broker_cpu) / rotated * 1000,
        broker_cpu=(done.broker_cpu - begin.broker_cpu) / span,
        idp_cpu=(done.idp_cpu - begin.idp_cpu) / span,
        db_cpu=None if database is None else (done.db_cpu - begin.db_cpu) / span,
        others_cpu=max(0.0, _others(begin, done)) / span,
        exec_to_done_s=done.at - started,
    )


def _others(begin: Sample, end: Sample) -> float:
    """CPU seconds that processes outside the benchmark used between two samples."""
    ours = (
        (end.broker_cpu - begin.broker_cpu)
        + (end.idp_cpu - begin.idp_cpu)
        + (end.db_cpu - begin.db_cpu)
        + (end.own_cpu - begin.own_cpu)
    )
    return end.busy - begin.busy - ours


def main(argv: Sequence[str] | None = None) -> None:
    """Run the rotation benchmark and print its tables."""
    p = parser("bench.rotation", __doc__)
    p.add_argument("--grants", type=int, default=2000, help="grants, all due at start (2000)")
    p.add_argument(
        "--concurrency",
        type=positive_ints,
        default=[8, 32],
        metavar="LIST",
        help="[refresh] max_concurrency values to run (default 8,32)",
    )
    p.add_argument("--stores", default=",".join(STORES), help="sqlite,postgresql (default both)")
    p.add_argument(
        "--runs",
        type=int,
        help="runs of each store and max_concurrency, taking turns; the median is judged "
        "(default 3, 1 with --smoke)",
    )
    p.add_argument(
        "--postgres-url",
        metavar="URL",
        help="an existing server to use (default: start a cluster with fsync on)",
    )
    p.add_argument(
        "--commit-seconds",
        type=float,
        default=3.0,
        help="how long to measure each raw commit rate (default 3)",
    )
    args = p.parse_args(argv)
    stores = [s for s in args.stores.split(",") if s]
    if unknown := set(stores) - set(STORES):
        p.error(f"--stores: unknown {', '.join(sorted(unknown))}; choose from sqlite,postgresql")
    if args.runs is not None and args.runs < 1:
        p.error("--runs: at least 1")
    if args.smoke:
        args.grants, args.commit_seconds = 30, 0.3
    if args.runs is None:
        args.runs = 1 if args.smoke else 3
    notes: list[str] = []
    storms: list[Storm] = []
    commits: list[tuple[str, int, float]] = []
    with workspace(args.log_dir, args.keep) as ws:
        report = Report.start("rotation", ws.root)
        if "sqlite" in stores:
            commits.append(("sqlite", 1, commit_rate.sqlite_rate(ws.root, args.commit_seconds)))
            storms += _storms(ws, "sqlite", args, lambda: None)
        if "postgresql" in stores and not pg.available(args.postgres_url):
            notes.append(
                "PostgreSQL skipped: server binaries not found (apt-get install postgresql)"
            )
        elif "postgresql" in stores:
            with pg.server(ws.root, args.postgres_url) as server:
                notes.append(f"PostgreSQL on 127.0.0.1: {pg.durability(server.url)}")
                raw_url = server.new_database()
                for connections in (1, max(args.concurrency)):
                    rate = commit_rate.postgres_rate(raw_url, args.commit_seconds, connections)
                    commits.append(("postgresql", connections, rate))
                storms += _storms(ws, "postgresql", args, server.new_database)
        report.results = {
            "storms": [asdict(s) for s in storms],
            "commit_rates": [
                {"store": s, "connections": n, "per_second": r} for s, n, r in commits
            ],
        }
        report.tables = _tables(storms, commits, notes, args.grants)
        report.finish()
    report.emit(args.json)


def _storms(
    ws: Workspace, store: str, args: argparse.Namespace, new_store: Callable[[], str | None]
) -> list[Storm]:
    """`args.runs` storms of each max_concurrency, the settings taking turns, each on a store
    of its own (`new_store`: a PostgreSQL database's URL, or None for a SQLite file). Named
    STORE-C for the first run, STORE-C-runN after."""
    storms = []
    for run in range(args.runs):
        for c in args.concurrency:
            url = new_store()
            storms.append(
                storm(
                    ws,
                    f"{store}-{c}" if run == 0 else f"{store}-{c}-run{run + 1}",
                    store=store,
                    store_url=url,
                    grants_total=args.grants,
                    concurrency=c,
                    database=None if url is None else pg.postmaster(url),
                )
            )
    return storms


def _tables(
    storms: list[Storm], commits: list[tuple[str, int, float]], notes: list[str], grants_total: int
) -> list[Table]:
    rotations = Table(
        f"Rotation throughput: {grants_total:,} grants due at once, in-memory rotating provider",
        [
            "store",
            "max_concurrency",
            "rotations/s",
            "each run",
            "CPU ms/rotation",
            "broker CPU",
            "IdP CPU",
            "DB CPU",
            "others' CPU",
            "exec to done s",
            "target",
            "met",
        ],
    )
    runs: dict[tuple[str, int], list[Storm]] = {}
    for s in storms:
        runs.setdefault((s.store, s.max_concurrency), []).append(s)
    for (store, concurrency), each in runs.items():
        has_target = (store, concurrency) == (TARGET_STORE, TARGET_CONCURRENCY)
        rate = statistics.median(s.rate for s in each)
        db = [s.db_cpu for s in each if s.db_cpu is not None]
        rotations.add(
            store,
            concurrency,
            rate,
            ", ".join(f"{s.rate:,.0f}" for s in each),
            statistics.median(s.cpu_ms for s in each),
            f"{statistics.median(s.broker_cpu for s in each):.0%}",
            f"{statistics.median(s.idp_cpu for s in each):.0%}",
            f"{statistics.median(db):.0%}" if db else None,
            f"{statistics.median(s.others_cpu for s in each):.0%}",
            statistics.median(s.exec_to_done_s for s in each),
            f">= {TARGET_RATE:,.0f}/s" if has_target else None,
            verdict(rate >= TARGET_RATE) if has_target else None,
        )
    rotations.notes = [
        "rotations/s: grants / (last commit seen in the store - first refresh at the provider); "
        "the median of the runs, each run's in the next column, the settings taking turns; "
        "the other columns are medians too",
        "CPU: the daemon's, the provider's and PostgreSQL's CPU while rotating, as shares of "
        "one core (SQLite works inside the daemon); others': what processes outside the "
        "benchmark took meanwhile (the noise)",
        *notes,
    ]
    ceiling = Table(
        "Raw durable commits (one row per transaction, same disk / same server)",
        ["store", "connections", "commits/s"],
    )
    for store, connections, rate in commits:
        ceiling.add(store, connections, rate)
    ceiling.notes = [
        "SQLite: WAL, synchronous=FULL, BEGIN IMMEDIATE, in the directory of the broker's store",
    ]
    if any(store == "postgresql" for store, _, _ in commits):
        ceiling.notes.append("PostgreSQL: autocommit INSERTs through asyncpg, same server")
    return [rotations, ceiling]


if __name__ == "__main__":
    main()
