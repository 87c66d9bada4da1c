"""Shared fixtures: keyrings, store URLs on SQLite and PostgreSQL, and the secret-leak scan.

Every token a test invents comes from the `new_secret` fixture, which remembers it. All logs
of the session (in-process structlog output and the stderr of every daemon a test starts, which
tests write under `log_dir`) are scanned when the session ends; any remembered secret found in
them fails the run.
"""

from __future__ import annotations

import contextlib
import io
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.crypto import Keyring
from broker.log import configure_logging
from broker.store.engine import create_engine
from broker.store.migrate import upgrade
from broker.store.repository import GrantRepository
from tests.model_idp import HandClock, ModelIdp
from tests.postgres import PostgresServer, postgres_server, postgres_url  # noqa: F401

SECRETS: set[str] = set()
# Rows of the fault matrix (tests/test_faults.py), printed at the end of the run.
FAULT_MATRIX: list[Any] = []
_SESSION_LOG = io.StringIO()
_LOG_DIRS: list[Path] = []


@contextlib.asynccontextmanager
async def migrated(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the store at `url`, migrated to the head, disposed at the end."""
    engine = create_engine(url)
    try:
        await upgrade(engine)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(autouse=True)
def _session_logging() -> None:
    """Route every test's logs into the session log that is scanned for secrets at the end."""
    configure_logging(level="debug", json=True, stream=_SESSION_LOG)


@pytest.fixture
def new_secret() -> Callable[[str], str]:
    """Make a random token-like value and remember it for the end-of-session leak scan."""

    def make(prefix: str = "tok") -> str:
        value = f"{prefix}-{secrets.token_urlsafe(24)}"
        SECRETS.add(value)
        return value

    return make


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """A directory for daemon stderr files; scanned for secrets when the session ends."""
    path = tmp_path / "logs"
    path.mkdir()
    _LOG_DIRS.append(path)
    return path


@pytest.fixture
def keyring() -> Keyring:
    """A fresh single-key keyring."""
    return Keyring.generate(datetime.now(UTC))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store: a SQLite file, or a fresh database on the suite's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
async def store_engine(store_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated store on SQLite or PostgreSQL, disposed after the test."""
    async with migrated(store_url) as engine:
        yield engine


# -- the refresher's world: a migrated SQLite store, a hand clock, the model IdP -----------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where the test's SQLite store lives."""
    return tmp_path / "broker.db"


@pytest.fixture
async def engine(db_path: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated SQLite store in the test's directory."""
    async with migrated(f"sqlite:///{db_path}") as engine:
        yield engine


@pytest.fixture
def repo(engine: AsyncEngine, keyring: Keyring) -> GrantRepository:
    """The grant repository over the test's store."""
    return GrantRepository(engine, keyring)


@pytest.fixture
def clock() -> HandClock:
    """The test's clock, shared by broker and model IdP."""
    return HandClock()


@pytest.fixture
def idp(clock: HandClock, new_secret: Callable[[str], str]) -> ModelIdp:
    """A model IdP without grace whose tokens the session's leak scan looks for."""
    return ModelIdp(clock, mint=new_secret)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault matrix measured in this run, if any."""
    if not FAULT_MATRIX:
        return
    write = terminalreporter.write_line
    write("")
    write("fault matrix (tests/test_faults.py):")
    header = (
        "| fault | store | grace | expected | end state | reuse | 500s | served | rejected | s |"
    )
    write(header)
    write("|---|---|---|---|---|---|---|---|---|---|")
    for row in sorted(FAULT_MATRIX, key=lambda r: (r.store, r.fault, r.grace)):
        mark = "" if row.ok else " **FAILED**"
        write(
            f"| {row.fault} | {row.store} | {row.grace} s | {row.expected} | "
            f"{row.end_state}{mark} | {row.reuse_detections} | {row.http_500} | "
            f"{row.served} | {row.rejected} | {row.seconds} |"
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any remembered secret reached a log."""
    texts = [("in-process logs", _SESSION_LOG.getvalue())]
    for directory in _LOG_DIRS:
        if directory.is_dir():
            texts += [
                (str(p), p.read_text(errors="replace")) for p in directory.rglob("*") if p.is_file()
            ]
    leaks = sorted({where for where, text in texts for value in SECRETS if value in text})
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    summary = (
        f"secret scan: {len(SECRETS)} secrets, {sum(len(t) for _, t in texts)} "
        f"characters of logs from {len(texts)} sources"
    )
    if reporter is not None:
        reporter.write_line(summary)
    if leaks:
        if reporter is not None:
            reporter.write_line("SECRET LEAKED into: " + ", ".join(leaks), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def iter_secret_leaks(text: str) -> Iterator[str]:
    """The remembered secrets that appear in `text`."""
    return (value for value in SECRETS if value in text)
