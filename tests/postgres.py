"""A throwaway PostgreSQL server for tests that need one, bound to 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

USER = "postgres"
START_TIMEOUT = 30.0


def _run_sql(url: str, sql: str) -> None:
    """Run one statement with asyncpg on a private thread, so no test event loop is disturbed."""

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=START_TIMEOUT)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result()


class PostgresServer:
    """A running cluster: one started here (`root` set) or an existing one given by URL."""

    def __init__(self, url: str, pg_bin: Path | None = None, root: Path | None = None) -> None:
        self.url = url
        self._pg_bin = pg_bin
        self._root = root
        self._created: list[str] = []

    def _with_db(self, name: str) -> str:
        return urlsplit(self.url)._replace(path="/" + name).geturl()

    def new_database(self) -> str:
        name = "tb_" + uuid.uuid4().hex
        _run_sql(self.url, f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return self._with_db(name)

    def stop(self) -> None:
        if self._root is None:  # an existing server: drop only what we created, leave it running
            for name in self._created:
                _run_sql(self.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self._created.clear()
            return
        if self._pg_bin is not None:
            data = self._root / "data"
            if (data / "postmaster.pid").exists():
                stop = [str(self._pg_bin / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)]
                done = _pg_run(stop)
                if done.returncode != 0:  # keep the data dir: the server may still be using it
                    raise RuntimeError(f"pg_ctl stop failed:\n{done.stdout}{done.stderr}")
        shutil.rmtree(self._root, ignore_errors=True)
        self._root = None


def find_pg_bin() -> Path | None:
    if env := os.environ.get("TOKEN_BROKER_PG_BIN"):
        return Path(env)

    def version(bin_dir: Path) -> tuple[int, ...]:
        parts = bin_dir.parent.name.split(".")
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (0,)

    found = [
        b
        for b in Path("/usr/lib/postgresql").glob("*/bin")
        if (b / "initdb").is_file() and (b / "pg_ctl").is_file()
    ]
    return max(found, key=version, default=None)


def _as_root() -> bool:
    return os.geteuid() == 0


def _pg_run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a server tool; as root through `runuser -u postgres`, since PostgreSQL refuses root."""
    if _as_root():
        args = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", USER, "--", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def _make_root(tmp_dir: Path) -> Path:
    """A fresh directory for the cluster that the server's OS user can reach."""
    parent = tmp_dir
    if _as_root() and not all(p.stat().st_mode & 0o001 for p in (tmp_dir, *tmp_dir.parents)):
        parent = Path(tempfile.gettempdir())  # e.g. pytest's 0700 dir: postgres cannot enter it
    root = Path(tempfile.mkdtemp(prefix="tb-pg-", dir=parent))
    if _as_root():
        pw = pwd.getpwnam(USER)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    return root


def start_postgres(tmp_dir: Path, *, fsync: bool = False) -> PostgresServer:
    """A new cluster under `tmp_dir`; without `fsync` (as tests want) commits are not durable."""
    pg_bin = find_pg_bin()
    if pg_bin is None:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    root = _make_root(tmp_dir)
    server = PostgresServer("", pg_bin, root)
    try:
        data, sock, log = root / "data", root / "sock", root / "server.log"
        initdb = [str(pg_bin / "initdb"), "-D", str(data), "-U", USER, "-A", "trust"]
        done = _pg_run([*initdb, "-E", "UTF8", "--locale=C", "--no-sync"], cwd=root)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}{done.stderr}")
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="utf-8"
        )
        _pg_run(["mkdir", "-m", "700", str(sock)])
        for _attempt in range(3):  # the free port may be taken between probing and binding
            port = _free_port()
            opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {shlex.quote(str(sock))}"
            start = [str(pg_bin / "pg_ctl"), "start", "-w", "-t", str(int(START_TIMEOUT))]
            opts += "" if fsync else " -c fsync=off"
            done = _pg_run([*start, "-D", str(data), "-l", str(log), "-o", opts])
            if done.returncode == 0 or "already in use" not in _log_tail(log):
                break
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{done.stderr}\n{_log_tail(log)}")
        server.url = f"postgresql://{USER}@127.0.0.1:{port}/postgres"
        isready = [str(pg_bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
        deadline = time.monotonic() + START_TIMEOUT
        while _pg_run(isready).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not accept connections:\n{_log_tail(log)}")
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    if url := os.environ.get("TOKEN_BROKER_TEST_PG_URL"):
        server = PostgresServer(url)
    elif find_pg_bin() is None:
        message = "PostgreSQL server binaries not found: apt-get install postgresql"
        if os.environ.get("TOKEN_BROKER_REQUIRE_PG") == "1":
            pytest.fail(f"{message} (or unset TOKEN_BROKER_REQUIRE_PG)")
        pytest.skip(message)
    else:
        server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.new_database()


class PrivatePostgres:
    """One test's own cluster, which the test may stop, start and restart under its clients.

    The session's shared server (`postgres_server`) must never be stopped; faults get this
    instead. Each call is bounded (pg_ctl -w -t) and returns only once the server refuses
    (stop) or accepts (start) connections on the same port and data directory. They block:
    from a test whose event loop also runs the code under test, call them with
    asyncio.to_thread. `stop(mode="fast")` ends every session (the server sends SQLSTATE 57P01,
    admin_shutdown; asyncpg then reports "connection is closed") and checkpoints;
    `mode="immediate"` is a crash, recovered at the next start.
    """

    def __init__(self, server: PostgresServer) -> None:
        if server._pg_bin is None or server._root is None:
            raise ValueError("PrivatePostgres needs a cluster made by start_postgres")
        self._server = server
        self._pg_bin = server._pg_bin
        self._data = server._root / "data"
        self._log = server._root / "server.log"
        self.url = server.url
        port = urlsplit(server.url).port
        assert port is not None
        self.port: int = port

    def new_database(self) -> str:
        """A fresh, empty database on this cluster."""
        return self._server.new_database()

    @property
    def running(self) -> bool:
        """Whether the postmaster is up (its pid file exists)."""
        return (self._data / "postmaster.pid").exists()

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m MODE (smart, fast or immediate); returns once connections are refused."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"pg_ctl has no stop mode {mode!r}: smart, fast or immediate")
        stop = [str(self._pg_bin / "pg_ctl"), "stop", "-w", "-t", str(int(START_TIMEOUT))]
        done = _pg_run([*stop, "-m", mode, "-D", str(self._data)])
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed:\n{done.stdout}{done.stderr}")
        self._wait(accepting=False)

    def start(self) -> None:
        """pg_ctl start with the options of the first start; returns once it accepts."""
        # postmaster.opts holds the command line of the last start and outlives a stop.
        argv = shlex.split((self._data / "postmaster.opts").read_text())[1:]
        if "-D" in argv:
            at = argv.index("-D")
            del argv[at : at + 2]  # pg_ctl passes its own -D
        start = [str(self._pg_bin / "pg_ctl"), "start", "-w", "-t", str(int(START_TIMEOUT))]
        done = _pg_run(
            [*start, "-D", str(self._data), "-l", str(self._log), "-o", shlex.join(argv)]
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{done.stderr}\n{_log_tail(self._log)}")
        self._wait(accepting=True)

    def restart(self, mode: str = "fast") -> None:
        """stop(mode), then start() on the same port and data directory."""
        self.stop(mode)
        self.start()

    def _wait(self, *, accepting: bool) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while _accepts(self.port) != accepting:
            if time.monotonic() > deadline:
                state = "accept" if accepting else "refuse"
                raise RuntimeError(
                    f"PostgreSQL did not {state} connections:\n{_log_tail(self._log)}"
                )
            time.sleep(0.05)


def _accepts(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:port is accepted."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, removed at the end whether running or not."""
    if find_pg_bin() is None:
        message = "PostgreSQL server binaries not found: apt-get install postgresql"
        if os.environ.get("TOKEN_BROKER_REQUIRE_PG") == "1":
            pytest.fail(f"{message} (or unset TOKEN_BROKER_REQUIRE_PG)")
        pytest.skip(message)
    server = start_postgres(tmp_path)
    try:
        yield PrivatePostgres(server)
    finally:
        server.stop()
