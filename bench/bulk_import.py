"""Bulk import rate: new grants per second into a running daemon with an empty store.

Two ways in, each into a store of its own (`--via both`, the default, runs them in turn):
`--via cli` times `token-broker import --jsonl FILE` (one process, start-up included), the bulk
path the >= 5,000 grants/s target is for; `--via post` sends `POST /v1/grants` with 16 requests
in flight, one new PROVIDER/USER each, from a lean client: raw HTTP/1.1 over asyncio
Unix-socket streams with every request encoded before the clock starts, so the client costs a
few microseconds per request and is not what is measured (its CPU share is in the table).
That is the one-grant API, shown for comparison with no target. Either way the store must
hold every grant afterwards. Imports need an admin: the client runs as the daemon's own uid
(or root).

    python -m bench.bulk_import [--grants 5000] [--in-flight 16] [--via both|cli|post]
                                [--smoke] [--json FILE]
"""

from __future__ import annotations

import asyncio
import collections
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.identity import token_client
from bench.install import PROVIDER, Installation, Workspace, daemon, install, workspace
from bench.machine import busy_seconds
from bench.options import parser
from bench.proc import cpu_seconds
from bench.report import Report, Table, verdict
from bench.seed import count, user_name
from bench.tokens import fake_token
from broker.store.engine import create_engine
from broker.store.migrate import upgrade

TARGET_RATE = 5000.0  # grants/s, for `import --jsonl`
VIAS = {"cli": "import --jsonl", "post": "POST /v1/grants"}  # --via: the table's label
CLI_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class ImportRun:
    """One bulk import."""

    via: str
    grants: int
    in_flight: int
    seconds: float
    rate: float
    broker_cpu: float  # share of one core
    client_cpu: float  # share of one core
    others_cpu: float  # share of one core taken by processes outside the benchmark


def import_bodies(total: int) -> list[dict[str, object]]:
    """`total` import bodies, one new grant each, with fresh fake tokens."""
    return [
        {
            "provider": PROVIDER,
            "user": user_name(i),
            "refresh_token": fake_token(),
            "access_token": fake_token(),
            "expires_in": 36_000,
            "scope": "profile",
        }
        for i in range(total)
    ]


def encode_post(body: dict[str, object]) -> bytes:
    """One keep-alive `POST /v1/grants` request, ready to write."""
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/grants HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> int:
    """The status of one response, its body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def post_all(socket: Path, requests: list[bytes], in_flight: int) -> collections.Counter[int]:
    """Send every request over `in_flight` connections; how many got each status."""
    statuses: collections.Counter[int] = collections.Counter()
    pending = iter(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_unix_connection(str(socket))
        try:
            for request in pending:  # shared: each request goes out once
                writer.write(request)
                statuses[await _read_response(reader)] += 1
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(in_flight)))
    return statuses


def via_post(
    installation: Installation, pid: int, bodies: list[dict[str, object]], in_flight: int
) -> ImportRun:
    """Import through the API; fail unless every answer is 201 Created."""
    requests = [encode_post(b) for b in bodies]
    usage, cpu, busy = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(pid), busy_seconds()
    started = time.monotonic()
    statuses = asyncio.run(post_all(installation.socket, requests, in_flight))
    seconds = time.monotonic() - started
    used = resource.getrusage(resource.RUSAGE_SELF)
    if statuses != {201: len(bodies)}:
        raise RuntimeError(f"import answers by status: {dict(statuses)}; expected all 201")
    client = (used.ru_utime + used.ru_stime) - (usage.ru_utime + usage.ru_stime)
    broker = cpu_seconds(pid) - cpu
    others = busy_seconds() - busy - broker - client
    return ImportRun(
        VIAS["post"],
        len(bodies),
        in_flight,
        seconds,
        len(bodies) / seconds,
        broker / seconds,
        client / seconds,
        max(0.0, others) / seconds,
    )


def cli_has_jsonl() -> bool:
    """Whether this version's `token-broker import` takes --jsonl."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "import", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "--jsonl" in done.stdout


def via_cli(
    installation: Installation, pid: int, bodies: list[dict[str, object]], work: Path
) -> ImportRun:
    """Import with `token-broker import --jsonl FILE`; fail unless it exits 0."""
    jsonl = work / "grants.jsonl"
    jsonl.write_text("".join(json.dumps(b) + "\n" for b in bodies))
    jsonl.chmod(0o600)
    command = [sys.executable, "-m", "broker", "-c", str(installation.home.config), "import"]
    cpu, busy = cpu_seconds(pid), busy_seconds()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        [*command, "--jsonl", str(jsonl)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    jsonl.unlink()
    if done.returncode != 0:
        tail = done.stderr[-2000:]
        raise RuntimeError(f"token-broker import --jsonl exited {done.returncode}:\n{tail}")
    broker = cpu_seconds(pid) - cpu
    client = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    others = busy_seconds() - busy - broker - client
    return ImportRun(
        VIAS["cli"],
        len(bodies),
        1,
        seconds,
        len(bodies) / seconds,
        broker / seconds,
        client / seconds,
        max(0.0, others) / seconds,
    )


async def _migrate(store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def import_once(
    ws: Workspace, via: str, bodies: list[dict[str, object]], in_flight: int
) -> ImportRun:
    """Import `bodies` one way into a new installation's empty store; check it holds them all."""
    installation = install(ws.directory(f"broker-{via}"))
    installation.write_config(client=token_client())
    asyncio.run(_migrate(installation.store_url))
    with daemon(installation, ws.logs, f"import-{via}") as broker:
        if via == "post":
            run = via_post(installation, broker.pid, bodies, in_flight)
        else:
            run = via_cli(installation, broker.pid, bodies, ws.root)
    stored = asyncio.run(count(installation.store_url))
    if stored != len(bodies):
        raise RuntimeError(f"the store holds {stored} grants after importing {len(bodies)}")
    return run


def main(argv: Sequence[str] | None = None) -> None:
    """Run the import benchmark and print its table."""
    p = parser("bench.bulk_import", __doc__)
    p.add_argument("--grants", type=int, default=5000, help="grants to import (default 5000)")
    p.add_argument("--in-flight", type=int, default=16, help="concurrent POSTs (default 16)")
    p.add_argument(
        "--via",
        choices=["both", *VIAS],
        default="both",
        help="`token-broker import --jsonl` (cli), POST /v1/grants (post), or both in turn "
        "(default)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.grants = 50
    vias = list(VIAS) if args.via == "both" else [args.via]
    if "cli" in vias and not cli_has_jsonl():
        p.error("this version has no `token-broker import --jsonl`; measure with --via post")
    with workspace(args.log_dir, args.keep) as ws:
        report = Report.start("bulk_import", ws.root)
        bodies = import_bodies(args.grants)
        runs = [import_once(ws, via, bodies, args.in_flight) for via in vias]
        table = Table(
            "Bulk import into an empty SQLite store",
            [
                "via",
                "grants",
                "in flight",
                "seconds",
                "grants/s",
                "broker CPU",
                "client CPU",
                "others' CPU",
                "target",
                "met",
            ],
        )
        for run in runs:
            bulk = run.via == VIAS["cli"]
            table.add(
                run.via,
                run.grants,
                run.in_flight,
                run.seconds,
                run.rate,
                f"{run.broker_cpu:.0%}",
                f"{run.client_cpu:.0%}",
                f"{run.others_cpu:.0%}",
                f">= {TARGET_RATE:,.0f}/s" if bulk else None,
                verdict(run.rate >= TARGET_RATE) if bulk else None,
            )
        table.notes = [
            "each grant is new (POST: 201 Created) and each way starts from an empty store, "
            "counted afterwards",
            "import --jsonl: one `token-broker import` process reading a file (start-up "
            "included), the bulk path the target is for; client CPU is that process's",
            "POST /v1/grants: the one-grant API, for comparison; client: the daemon's own uid "
            "(admin)",
            "CPU columns are shares of one core; others': what processes outside the "
            "benchmark took meanwhile (the noise)",
        ]
        report.tables = [table]
        report.results = {"runs": [asdict(run) for run in runs]}
        report.finish()
    report.emit(args.json)


if __name__ == "__main__":
    main()
