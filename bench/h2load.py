"""Driving h2load (nghttp2's C load generator) over a Unix socket, and reading its results.

h2load is the client because a Python client saturates long before an aiohttp server does, and
then measures itself. Throughput comes from h2load's summary line; latency percentiles from its
`--log-file`, which has one line per request: start time (µs since the epoch), HTTP status (-1
for a failed stream) and the microseconds until the end of the response.
"""

from __future__ import annotations

import random
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.identity import ClientIdentity

TIMEOUT = 600.0  # seconds; h2load stops by itself after -n requests, this only bounds a hang
_FINISHED = re.compile(r"finished in [\d.]+\w+, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One h2load run."""

    connections: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    client_cpu_s: float
    wall_s: float

    def as_dict(self) -> dict[str, float | int]:
        """For --json output."""
        return asdict(self)


def h2load_path() -> str:
    """The h2load executable; a message that says how to install it otherwise."""
    path = shutil.which("h2load")
    if path is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    return path


def write_uris(path: Path, names: Iterable[tuple[str, str]], seed: int = 0) -> int:
    """Write one token URI per PROVIDER/USER, in a fixed shuffled order; how many."""
    uris = [f"http://broker/v1/tokens/{provider}/{user}" for provider, user in names]
    random.Random(seed).shuffle(uris)
    path.write_text("\n".join(uris) + "\n")
    path.chmod(0o644)
    return len(uris)


def percentile(sorted_values: list[int], fraction: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def run(
    socket: Path,
    uris: Path,
    *,
    requests: int,
    connections: int,
    log_file: Path,
    client: ClientIdentity,
) -> LoadResult:
    """Send `requests` GETs over `connections` HTTP/1.1 connections; every one must be a 2xx."""
    log_file.unlink(missing_ok=True)
    command = [
        *client.prefix,
        h2load_path(),
        "--h1",
        "-B",
        f"unix:{socket}",
        "-i",
        str(uris),
        "-n",
        str(requests),
        "-c",
        str(connections),
        "-t",
        "1",
        f"--log-file={log_file}",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout
    finished, counts, statuses = _FINISHED.search(out), _REQUESTS.search(out), _STATUS.search(out)
    if done.returncode != 0 or finished is None or counts is None or statuses is None:
        raise RuntimeError(f"h2load failed (exit {done.returncode}):\n{out}\n{done.stderr}")
    total, succeeded, failed = (int(g) for g in counts.groups())
    two_xx, *others = (int(g) for g in statuses.groups())
    if failed or succeeded != total or two_xx != total:
        raise RuntimeError(
            f"h2load: {succeeded} of {total} requests succeeded, {failed} failed, "
            f"{two_xx} 2xx and {sum(others)} others (3xx/4xx/5xx):\n{out}"
        )
    latencies = sorted(_latencies(log_file))
    if len(latencies) != total:
        raise RuntimeError(f"h2load logged {len(latencies)} of {total} requests in {log_file}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return LoadResult(
        connections=connections,
        requests=total,
        rps=float(finished.group(1)),
        p50_ms=percentile(latencies, 0.50) / 1000,
        p99_ms=percentile(latencies, 0.99) / 1000,
        client_cpu_s=cpu,
        wall_s=wall,
    )


def _latencies(log_file: Path) -> list[int]:
    """Microseconds per successful request from an h2load log file."""
    values = []
    for line in log_file.read_text().splitlines():
        _start, status, micros = line.split("\t")[:3]
        if status != "-1":
            values.append(int(micros))
    return values
