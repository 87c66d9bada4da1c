"""The benchmarks (bench/) run end to end at tiny sizes and print their tables.

These are smoke runs: each starts the real daemon (and h2load, the fake provider, the bare
handler or PostgreSQL as it needs), so a benchmark broken by a change to the daemon fails here
rather than on the day someone wants numbers. They assert that the run completed and produced
its tables and JSON, never any timing. Every daemon log lands in `log_dir`, which the
session's secret scan reads, and each benchmark checks its own fake token values stayed out.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.tokens import PREFIX
from tests.postgres import PostgresServer

pytestmark = pytest.mark.slow
TIMEOUT = 120.0
PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def h2load() -> None:
    """h2load present; a skip without it, or a failure under TOKEN_BROKER_REQUIRE_TOOLS=1."""
    if shutil.which("h2load") is None:
        reason = "h2load not found (apt-get install nghttp2-client)"
        if os.environ.get("TOKEN_BROKER_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{reason}; TOKEN_BROKER_REQUIRE_TOOLS=1 makes that a failure")
        pytest.skip(reason)


def run_bench(module: str, tmp_path: Path, log_dir: Path, *extra: str) -> tuple[str, Any]:
    """Run `python -m MODULE --smoke`; its stdout and its JSON results."""
    out = tmp_path / f"{module}.json"
    stdout = run_module(module, "--smoke", "--json", str(out), "--log-dir", str(log_dir), *extra)
    return stdout, json.loads(out.read_text())


def run_module(module: str, *args: str) -> str:
    """Run `python -m MODULE ARGS` from the project directory; its stdout, once it exited 0."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        cwd=PROJECT,
    )
    assert done.returncode == 0, f"{module} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def rows(results: Any, title_start: str) -> list[list[Any]]:
    """The rows of the table whose title starts with `title_start`."""
    tables = [t for t in results["tables"] if t["title"].startswith(title_start)]
    assert len(tables) == 1, [t["title"] for t in results["tables"]]
    return list(tables[0]["rows"])


def assert_clean_logs(log_dir: Path, *names: str) -> None:
    """Each named daemon wrote its log, and no benchmark token is in any log."""
    for name in names:
        assert (log_dir / f"{name}.stderr.log").is_file(), sorted(p.name for p in log_dir.iterdir())
    for path in log_dir.iterdir():
        assert PREFIX not in path.read_text(errors="replace"), path


def test_serving_compares_the_daemon_with_the_bare_handler(
    h2load: None, tmp_path: Path, log_dir: Path
) -> None:
    """Serving measures the daemon and the bare handler at 1, 16 and 64 connections."""
    stdout, results = run_bench("bench.serving", tmp_path, log_dir)
    assert "Serving throughput" in stdout
    assert "Serving latency" in stdout
    throughput = rows(results, "Serving throughput")
    assert [row[0] for row in throughput] == [1, 16, 64]
    assert all(row[1] > 0 and row[2] > 0 for row in throughput)
    assert {run["server"] for run in results["results"]["runs"]} == {"broker", "bare"}
    if os.geteuid() == 0:  # able to switch uid: the common, non-admin client path is measured
        assert "non-admin" in results["results"]["client"]
    assert_clean_logs(log_dir, "serving")


def test_rotation_rotates_every_grant_on_sqlite(tmp_path: Path, log_dir: Path) -> None:
    """Rotation rotates every seeded grant once per concurrency and run, and measures the
    disk; each setting's row holds the median of its runs and each run's rate."""
    stdout, results = run_bench(
        "bench.rotation", tmp_path, log_dir, "--stores", "sqlite", "--runs", "2"
    )
    assert "Rotation throughput" in stdout
    storms = rows(results, "Rotation throughput")
    assert [(row[0], row[1]) for row in storms] == [("sqlite", 8), ("sqlite", 32)]
    runs = results["results"]["storms"]
    assert [(r["store"], r["max_concurrency"]) for r in runs] == [
        ("sqlite", 8),
        ("sqlite", 32),
        ("sqlite", 8),
        ("sqlite", 32),
    ]
    for row in storms:
        rates = [r["rate"] for r in runs if r["max_concurrency"] == row[1]]
        assert row[2] == pytest.approx(statistics.median(rates), rel=0.01)
        assert row[3] == ", ".join(f"{rate:,.0f}" for rate in rates)
    assert [row[:2] for row in rows(results, "Raw durable commits")] == [["sqlite", 1]]
    assert_clean_logs(log_dir, "sqlite-8", "sqlite-32", "sqlite-8-run2", "sqlite-32-run2")


@pytest.mark.postgres
def test_rotation_rotates_every_grant_on_postgresql(
    postgres_server: PostgresServer, tmp_path: Path, log_dir: Path
) -> None:
    """Rotation on PostgreSQL runs too, and names the server's durability settings."""
    stdout, results = run_bench(
        "bench.rotation",
        tmp_path,
        log_dir,
        "--stores",
        "postgresql",
        "--postgres-url",
        postgres_server.url,
    )
    assert "fsync=" in stdout
    storms = rows(results, "Rotation throughput")
    assert [(row[0], row[1]) for row in storms] == [("postgresql", 8), ("postgresql", 32)]
    commits = rows(results, "Raw durable commits")
    assert [row[:2] for row in commits] == [["postgresql", 1], ["postgresql", 32]]
    assert_clean_logs(log_dir, "postgresql-8", "postgresql-32")


def test_scale_measures_each_size(h2load: None, tmp_path: Path, log_dir: Path) -> None:
    """Scale starts a daemon per size and reports readiness, memory, idle CPU and p99, then
    compares the largest size's p99 with the smallest's, the two daemons side by side."""
    stdout, results = run_bench("bench.scale", tmp_path, log_dir)
    assert "Scale targets" in stdout
    sizes = rows(results, "Scale: ")
    assert [row[0] for row in sizes] == [0, 10, 20]
    assert all(row[1] > 0 and row[2] > 0 for row in sizes)
    assert sizes[0][5] is None  # no token requests against an empty store
    assert all(row[7] > 0 for row in sizes[1:])
    compared = rows(results, "Token latency, 10 against 20")
    assert [(row[0], row[1]) for row in compared] == [(10, 1), (20, 1)]
    assert all(row[4] > 0 for row in compared)
    assert all(row[5] > 0 and row[6] > 0 for row in compared)  # RSS once served, at the end
    comparison = results["results"]["comparison"]
    assert (comparison["reference"], comparison["largest"]) == (10, 20)
    targets = {row[0]: row for row in rows(results, "Scale targets")}
    assert targets["RSS MiB, every grant served"][1] == max(comparison["served_rss_mib"]["20"])
    assert_clean_logs(log_dir, "scale-0", "scale-10", "scale-20", "compare-10", "compare-20")


def test_bulk_import_through_make_bench_stores_every_grant_both_ways(
    tmp_path: Path, log_dir: Path
) -> None:
    """`python -m bench` (`make bench`) runs bulk import both ways, `token-broker import
    --jsonl` (judged against the target) and POST /v1/grants (for comparison), each storing
    every grant it sends into a store of its own."""
    json_dir = tmp_path / "results"
    stdout = run_module(
        "bench",
        "--smoke",
        "--only",
        "bulk_import",
        "--json-dir",
        str(json_dir),
        "--log-dir",
        str(log_dir),
    )
    assert "Bulk import" in stdout
    assert "all benchmarks:" in stdout
    assert sorted(p.name for p in json_dir.iterdir()) == ["bulk_import.json"]
    results = json.loads((json_dir / "bulk_import.json").read_text())
    cli, post = rows(results, "Bulk import")
    assert cli[:2] == ["import --jsonl", 50]
    assert cli[-2] == ">= 5,000/s"
    assert cli[-1] in ("yes", "NO")
    assert post[:2] == ["POST /v1/grants", 50]
    assert post[-2:] == [None, None]  # the one-grant API carries no target
    assert [run["via"] for run in results["results"]["runs"]] == [
        "import --jsonl",
        "POST /v1/grants",
    ]
    assert_clean_logs(log_dir, "import-cli", "import-post")


def test_markdown_renders_a_result_file_as_the_tables_it_holds(tmp_path: Path) -> None:
    """`python -m bench.markdown` prints a result file's tables as Markdown, notes and all."""
    result = {
        "benchmark": "bulk_import",
        "started": "2026-01-01T00:00:00+00:00",
        "load_average": {"start": 0.25, "end": 0.5},
        "seconds": 12.0,
        "tables": [
            {
                "title": "Bulk import",
                "columns": ["via", "grants/s", "met"],
                "rows": [["POST /v1/grants", 1234.4, None]],
                "notes": ["each grant is new"],
            }
        ],
    }
    path = tmp_path / "bulk_import.json"
    path.write_text(json.dumps(result))
    out = run_module("bench.markdown", str(path))
    assert "load average 0.25 at start, 0.50 at end; 12 s" in out
    assert "| via | grants/s | met |" in out
    assert "| POST /v1/grants | 1,234 | - |" in out
    assert "- each grant is new" in out
