"""Tests for broker.sinks: the file a sink keeps, on the real file system.

The pure part (what a sink should hold, the formats) is tested directly; the writers run as
the daemon runs them, subscribed to a real GrantCache, with the real clock, writing real
files. Changes reach them as a committed refresh's do: a `put` of a newer grant version.
The file system itself (atomic replacement, modes, owners) is tests/test_sinkfile.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.cache import GrantCache
from broker.config import SinkConfig, SinkFormat
from broker.metrics import Metrics
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.sinks import Remove, Sinks, Write, render, settled, target
from tests.conftest import iter_secret_leaks
from tests.daemon import Home, make_home, request, running_daemon
from tests.test_api import TOKEN_FIELDS, served_api

QUICK = 5.0  # seconds a test waits for what should take milliseconds
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def utcnow() -> datetime:
    """The wall clock, as the daemon's."""
    return datetime.now(UTC)


def grant_of(access: str | None, *, expires_in: float = 3600, **changes: object) -> Grant:
    """An active grant of techniek/alice whose token expires `expires_in` seconds from now."""
    grant = Grant(
        id="0123456789abcdef0123456789abcdef",
        provider="techniek",
        user="alice",
        state=GrantState.ACTIVE,
        generation=1,
        tokens=TokenSet(
            refresh_token=Secret("rt-unused-here"),
            access_token=None if access is None else Secret(access),
        ),
        scopes=("openid", "profile"),
        access_expires_at=utcnow() + timedelta(seconds=expires_in),
        version=1,
    )
    return dataclasses.replace(grant, **changes)  # type: ignore[arg-type]


def later(grant: Grant, access: str, **changes: object) -> Grant:
    """The next generation of `grant`, as a committed refresh publishes it."""
    return dataclasses.replace(
        grant,
        generation=grant.generation + 1,
        version=grant.version + 1,
        tokens=dataclasses.replace(grant.tokens, access_token=Secret(access)),
        **changes,  # type: ignore[arg-type]
    )


def sink(path: Path, fmt: SinkFormat = "token", **changes: object) -> SinkConfig:
    """A sink of techniek/alice."""
    return dataclasses.replace(
        SinkConfig(grant="techniek/alice", path=path, format=fmt),
        **changes,  # type: ignore[arg-type]
    )


def sample(metrics: Metrics, outcome: str) -> float:
    """token_broker_sink_writes_total{outcome}."""
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "token_broker_sink_writes_total" and s.labels == {"outcome": outcome}:
                return float(s.value)
    raise AssertionError("no sink_writes_total sample for " + outcome)


async def eventually(check: Callable[[], bool], what: str, within: float = QUICK) -> None:
    """Wait until `check()` holds, at most `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.005)


def content(path: Path) -> str | None:
    """The file's text, or None when there is no file."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


# -- what a sink should hold (pure) ---------------------------------------------------------------


def test_an_active_grant_with_a_live_token_is_written_by_generation() -> None:
    """The target names the row, generation and expiry, never the token."""
    grant = grant_of("at-secret-value")
    wanted = target(grant, utcnow())
    assert wanted == Write(grant.id, 1, grant.access_expires_at)
    assert "at-secret" not in repr(wanted)
    assert settled(wanted, Write(grant.id, 1, grant.access_expires_at))
    assert not settled(wanted, Write(grant.id, 2, grant.access_expires_at))
    assert not settled(wanted, None)


@pytest.mark.parametrize(
    ("grant", "reason"),
    [
        (None, "does not exist"),
        (grant_of("at", state=GrantState.REAUTH_REQUIRED), "reauth_required"),
        (grant_of("at", state=GrantState.REVOKED), "revoked"),
        (grant_of("at", expires_in=-1), "expired"),
        (grant_of(None), "expired"),
        (
            grant_of("at", expires_in=-1, tokens=TokenSet(access_token=Secret("at"))),
            "reauth_required",
        ),
    ],
    ids=["deleted", "needs-login", "revoked", "expired", "no-token", "expired-no-refresh-token"],
)
def test_a_grant_that_cannot_be_served_removes_the_file(grant: Grant | None, reason: str) -> None:
    """Deleted, needing a login (even with a token still valid), revoked, or without a live
    token: the file goes, for a reason that says so."""
    wanted = target(grant, utcnow())
    assert isinstance(wanted, Remove)
    assert reason in wanted.reason
    assert settled(wanted, Remove("any other reason"))


def test_the_formats_are_the_bare_token_a_header_line_and_the_token_routes_body() -> None:
    """token: the token without a newline; header: `Authorization: Bearer` and a newline;
    json: the GET body's fields."""
    grant = grant_of("at-value", access_expires_at=NOW + timedelta(seconds=600))
    assert render(grant, "token", NOW) == b"at-value"
    assert render(grant, "header", NOW) == b"Authorization: Bearer at-value\n"
    body = json.loads(render(grant, "json", NOW))
    assert set(body) == TOKEN_FIELDS
    assert body == {
        "access_token": "at-value",
        "token_type": "Bearer",
        "expires_in": 600,
        "expires_at": "2030-01-02T03:14:05Z",
        "scope": "openid profile",
        "provider": "techniek",
        "user": "alice",
    }


async def test_the_json_format_is_byte_for_byte_what_the_api_serves(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """A json sink holds exactly the body GET /v1/tokens answers at the same moment."""
    async with served_api(tmp_path) as api:
        reply = await api.import_grant(
            provider="techniek",
            user="alice",
            refresh_token=new_secret("rt"),
            access_token=new_secret("at"),
            expires_in=3600,
        )
        assert reply.status == 201
        served = await api.call("GET", "/v1/tokens/techniek/alice")
        grant = await api.repository.get("techniek", "alice")
        assert grant is not None
        assert json.loads(render(grant, "json", api.clock())) == served.json()


# -- the writers, following the cache -------------------------------------------------------------


class Rig:
    """A cache, metrics and the Sinks of a config, started as the daemon starts them."""

    def __init__(self, configs: list[SinkConfig], cache: GrantCache | None = None) -> None:
        self.cache = cache if cache is not None else GrantCache()
        self.metrics = Metrics(["techniek"])
        self.sinks = Sinks(
            configs,
            cache=self.cache,
            clock=utcnow,
            metrics=self.metrics,
            retry=lambda _failures: 0.05,
        )

    def count(self, outcome: str) -> float:
        """sink_writes_total for `outcome`."""
        return sample(self.metrics, outcome)


@pytest.fixture
def log_lines() -> Iterator[list[MutableMapping[str, Any]]]:
    """The structlog events logged during the test."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@contextlib.asynccontextmanager
async def started(rig: Rig) -> AsyncIterator[Rig]:
    """Start the sinks; stop them at the end."""
    rig.sinks.start()
    try:
        yield rig
    finally:
        await rig.sinks.stop()


async def test_a_sink_is_written_at_start_and_after_every_new_generation(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """Start writes the cached token; a newer generation rewrites the file; a write of the
    same generation (an intent, a lease) leaves it alone."""
    path = tmp_path / "alice.token"
    first, second = new_secret("at"), new_secret("at")
    cache = GrantCache()
    grant = grant_of(first)
    cache.put(grant)
    rig = Rig([sink(path, mode=0o640)], cache)
    async with started(rig):
        await eventually(lambda: content(path) == first, "the file holds the first token")
        await eventually(lambda: rig.count("written") == 1, "the write counted")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        inode = path.stat().st_ino
        cache.put(dataclasses.replace(grant, version=5, intent_at=utcnow()))
        await asyncio.sleep(0.1)
        assert path.stat().st_ino == inode
        assert rig.count("written") == 1
        cache.put(later(grant, second))
        await eventually(lambda: content(path) == second, "the file holds the second token")
        await eventually(lambda: rig.count("written") == 2, "two writes counted")


async def test_a_sink_file_goes_when_a_login_is_needed_and_comes_back_after_one(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """reauth_required removes the file at once, though the token is still valid; a new login
    (a new generation, active) writes it again; deleting the grant removes it."""
    path = tmp_path / "alice.token"
    cache = GrantCache()
    grant = grant_of(new_secret("at"))
    cache.put(grant)
    rig = Rig([sink(path)], cache)
    async with started(rig):
        await eventually(path.exists, "the file is written")
        failed = dataclasses.replace(
            grant, state=GrantState.REAUTH_REQUIRED, last_error="invalid_grant", version=2
        )
        cache.put(failed)
        await eventually(lambda: not path.exists(), "the file is removed")
        await eventually(lambda: rig.count("removed") == 1, "the removal counted")
        relogged = new_secret("at")
        cache.put(later(failed, relogged, state=GrantState.ACTIVE, last_error=None))
        await eventually(lambda: content(path) == relogged, "the file is back")
        cache.drop("techniek", "alice")
        await eventually(lambda: not path.exists(), "the file is removed with the grant")
        await eventually(lambda: rig.count("removed") == 2, "both removals counted")


async def test_a_sink_file_goes_when_its_token_expires_before_a_refresh_arrives(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """With no newer token by its expiry, the file is removed at the expiry (a timer: no
    publish tells of it), and a later refresh writes it again."""
    path = tmp_path / "alice.token"
    cache = GrantCache()
    grant = grant_of(new_secret("at"), expires_in=0.4)
    cache.put(grant)
    rig = Rig([sink(path)], cache)
    async with started(rig):
        await eventually(path.exists, "the file is written")
        written = time.monotonic()
        await eventually(lambda: not path.exists(), "the file is removed at expiry")
        assert time.monotonic() - written < 2.0
        refreshed = new_secret("at")
        cache.put(later(grant, refreshed, access_expires_at=utcnow() + timedelta(hours=1)))
        await eventually(lambda: content(path) == refreshed, "the refreshed token is written")


async def test_a_stale_file_of_a_grant_that_is_gone_is_removed_at_start(tmp_path: Path) -> None:
    """A file left from before (its grant deleted since) is removed when the sink starts."""
    path = tmp_path / "alice.token"
    path.write_text("at-from-a-previous-run")
    rig = Rig([sink(path)])
    async with started(rig):
        await eventually(lambda: not path.exists(), "the stale file is removed")
        await eventually(lambda: rig.count("removed") == 1, "the removal counted")


async def test_a_failed_write_is_logged_counted_retried_and_never_blocks_the_publisher(
    tmp_path: Path,
    new_secret: Callable[[str], str],
    log_lines: list[MutableMapping[str, Any]],
) -> None:
    """A missing directory fails the write: logged with the path and the reason (never the
    token), counted as failed, retried with back-off, and written once the directory exists;
    the cache's put returns at once meanwhile."""
    path = tmp_path / "missing" / "alice.token"
    token = new_secret("at")
    cache = GrantCache()
    rig = Rig([sink(path)], cache)
    async with started(rig):
        cache.put(grant_of(token))
        assert rig.count("failed") == 0  # the publisher returned before any file I/O
        await eventually(lambda: rig.count("failed") >= 3, "three failed attempts")
        failures = [e for e in log_lines if e["event"] == "sink_write_failed"]
        assert failures[0]["path"] == str(path)
        assert failures[0]["reason"] == "No such file or directory"
        assert failures[0]["grant"] == "techniek/alice"
        assert [e["failures"] for e in failures[:3]] == [1, 2, 3]
        path.parent.mkdir()
        await eventually(lambda: content(path) == token, "written once the directory exists")
        await eventually(lambda: rig.count("written") == 1, "the write counted")
        written = [e for e in log_lines if e["event"] == "sink_written"]
        assert written[-1]["after_failures"] >= 3
    assert not any(iter_secret_leaks(json.dumps(log_lines, default=str)))
    assert token not in json.dumps(log_lines, default=str)


async def test_stop_lets_a_sink_catch_up_with_the_last_commit(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """A commit published just before shutdown reaches the file before stop() returns."""
    path = tmp_path / "alice.token"
    cache = GrantCache()
    grant = grant_of(new_secret("at"))
    cache.put(grant)
    rig = Rig([sink(path)], cache)
    rig.sinks.start()
    await eventually(path.exists, "the file is written")
    last = new_secret("at")
    cache.put(later(grant, last))
    await rig.sinks.stop()
    assert content(path) == last


async def test_a_reload_adds_removes_and_changes_sinks(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """replace() starts a new sink, removes a dropped sink's file, rewrites a changed one
    with its new settings, and a sink dropped and put back at once keeps its file."""
    token = new_secret("at")
    cache = GrantCache()
    cache.put(grant_of(token))
    kept, dropped, added = tmp_path / "kept", tmp_path / "dropped", tmp_path / "added"
    rig = Rig([sink(kept), sink(dropped)], cache)
    async with started(rig):
        await eventually(lambda: kept.exists() and dropped.exists(), "both files are written")
        rig.sinks.replace([sink(kept, "header", mode=0o640), sink(added, "json")])
        await eventually(lambda: not dropped.exists(), "the dropped sink's file is removed")
        await eventually(lambda: content(kept) == f"Authorization: Bearer {token}\n", "header")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
        await eventually(added.exists, "the added sink is written")
        assert json.loads(added.read_text())["access_token"] == token
        assert len(rig.sinks) == 2
        rig.sinks.replace([sink(kept, "header", mode=0o640)])
        rig.sinks.replace([sink(kept, "header", mode=0o640), sink(added, "json")])
        await asyncio.sleep(0.2)
        assert added.exists()
        assert json.loads(added.read_text())["access_token"] == token


# -- the daemon: start and SIGHUP -----------------------------------------------------------------


def _with_sinks(home: Home, *tables: dict[str, str]) -> None:
    """The home's config with these [[sinks]] tables."""
    home.write_config()
    text = home.config.read_text()
    for table in tables:
        text += "\n[[sinks]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    home.config.write_text(text)


async def _until(check: Callable[[], bool], what: str) -> None:
    await eventually(check, what, within=15.0)


async def test_the_daemon_writes_its_sinks_and_sighup_adds_changes_and_removes_them(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """A running daemon writes a sink for an imported grant; SIGHUP with another [[sinks]]
    list removes the dropped file, writes the added one and rewrites a changed one; a config
    with a bad sink is refused whole and the sinks stay as they were."""
    home = make_home(tmp_path)
    sinks = tmp_path / "sinks"
    sinks.mkdir()
    kept, dropped, added = sinks / "kept", sinks / "dropped", sinks / "added.json"
    alice = {"grant": "techniek/alice"}
    _with_sinks(home, {**alice, "path": str(kept)}, {**alice, "path": str(dropped)})
    access = new_secret("at")
    with running_daemon(home, log_dir) as daemon:
        body = {
            "provider": "techniek",
            "user": "alice",
            "refresh_token": new_secret("rt"),
            "access_token": access,
            "expires_in": 3600,
        }
        assert request(home.socket, "POST", "/v1/grants", body).status == 201
        await _until(lambda: content(kept) == access and content(dropped) == access, "written")

        _with_sinks(
            home,
            {**alice, "path": str(kept), "format": "header", "mode": "0640"},
            {**alice, "path": str(added), "format": "json"},
        )
        os.kill(daemon.pid, signal.SIGHUP)
        await _until(lambda: not dropped.exists(), "the dropped sink's file is removed")
        await _until(lambda: content(kept) == f"Authorization: Bearer {access}\n", "rewritten")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
        await _until(added.exists, "the added sink is written")
        assert json.loads(added.read_text())["access_token"] == access

        _with_sinks(home, {**alice, "path": str(kept), "owner": "no-such-user-here"})
        os.kill(daemon.pid, signal.SIGHUP)
        await _until(lambda: '"reload_refused"' in daemon.log(), "the reload is refused")
        await asyncio.sleep(0.3)
        assert added.exists()
        assert content(kept) == f"Authorization: Bearer {access}\n"
    assert access not in daemon.log()
