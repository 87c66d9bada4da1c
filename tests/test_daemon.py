"""Tests for broker.daemon: `token-broker serve` as a real subprocess, from start to SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

import broker
from broker.crypto import Keyring, load_keyring, write_keyring
from broker.daemon import _awaiting
from broker.store.engine import create_engine
from broker.store.migrate import current_revision, head_revision, upgrade
from broker.tasks import Tasks
from tests.daemon import (
    Home,
    clean_env,
    failed_start,
    free_port,
    make_home,
    request,
    running_daemon,
)


def _import(home: Home, new_secret: Callable[[str], str], user: str = "alice") -> str:
    """Import one grant with an access token through the API; the access token."""
    access = new_secret("at")
    reply = request(
        home.socket,
        "POST",
        "/v1/grants",
        {
            "provider": "techniek",
            "user": user,
            "refresh_token": new_secret("rt"),
            "access_token": access,
            "expires_in": 3600,
        },
    )
    assert reply.status == 201, reply.body
    return access


def _serving_line(log: str) -> dict[str, object]:
    lines = [json.loads(line) for line in log.splitlines() if '"serving"' in line]
    assert lines, log
    event: dict[str, object] = lines[0]
    return event


def test_serve_runs_on_uvloop_when_it_is_installed_and_on_asyncio_without(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """The `fast` extra's uvloop carries the daemon when it can be imported (the suite installs
    it); without it the daemon runs on asyncio's own loop and serves the same."""
    pytest.importorskip("uvloop")
    home = make_home(tmp_path)
    with running_daemon(home, log_dir) as daemon:
        access = _import(home, new_secret)
        token = request(home.socket, "GET", "/v1/tokens/techniek/alice")
        assert json.loads(token.body)["access_token"] == access
    assert _serving_line(daemon.log())["event_loop"] == "uvloop"

    hidden = tmp_path / "no-uvloop"
    hidden.mkdir()
    (hidden / "uvloop.py").write_text('raise ImportError("uvloop is hidden by the test")\n')
    with running_daemon(home, log_dir, name="plain", env={"PYTHONPATH": str(hidden)}) as plain:
        token = request(home.socket, "GET", "/v1/tokens/techniek/alice")
        assert json.loads(token.body)["access_token"] == access
    assert _serving_line(plain.log())["event_loop"] == "asyncio"


@pytest.mark.parametrize("mode", ["0600", "0660"])
def test_serve_creates_the_socket_with_the_configured_mode(
    tmp_path: Path, log_dir: Path, mode: str
) -> None:
    """The socket file is a socket with exactly socket_mode, and the store is migrated to head."""
    home = make_home(tmp_path, socket_mode=mode)
    with running_daemon(home, log_dir):
        info = home.socket.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == int(mode, 8)
        with contextlib.closing(sqlite3.connect(home.db)) as db:
            (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        assert revision == head_revision()


def test_ready_is_sent_to_notify_socket_once_the_socket_answers(
    tmp_path: Path, log_dir: Path
) -> None:
    """READY=1 reaches $NOTIFY_SOCKET after the API socket and the metrics listener answer."""
    port = free_port()
    home = make_home(tmp_path, metrics=f"127.0.0.1:{port}")
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(15.0)
        with running_daemon(
            home, log_dir, env={"NOTIFY_SOCKET": str(notify_path)}, wait=False
        ) as daemon:
            try:
                first = notify.recv(4096)
            except TimeoutError:
                pytest.fail(f"no sd_notify datagram in 15s:\n{daemon.log_tail()}")
            assert first.startswith(b"READY=1\nSTATUS=serving 0 grants")
            # Nothing polled the socket before READY: it must answer right away.
            assert request(home.socket, "GET", "/healthz").status == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            assert f'token_broker_build_info{{version="{broker.__version__}"}} 1.0' in text
        while (message := notify.recv(4096)).startswith(b"STATUS="):
            pass  # the status line, refreshed while serving
        assert message == b"STOPPING=1\nSTATUS=stopping"


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_sigterm_lets_a_request_in_flight_finish(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """An import stuck on a database lock at SIGTERM still gets its 201; then exit 0."""
    home = make_home(tmp_path)
    body = json.dumps(
        {"provider": "techniek", "user": "alice", "refresh_token": new_secret("rt")}
    ).encode()
    message = (
        b"POST /v1/grants HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with running_daemon(home, log_dir) as daemon:
        # Another writer holds SQLite's write lock, so the import waits inside its handler
        # (busy_timeout) until the test lets go: a request deterministically in flight.
        blocker = sqlite3.connect(home.db, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(15.0)
                conn.connect(str(home.socket))
                conn.sendall(message)
                # A round trip on another connection: by now the daemon has read the whole
                # import request and its handler is running.
                assert request(home.socket, "GET", "/healthz").status == 200
                conn.setblocking(False)
                with pytest.raises(BlockingIOError):
                    conn.recv(1, socket.MSG_PEEK)  # no answer yet: the import is in flight
                conn.settimeout(15.0)
                daemon.terminate()
                _wait_for(lambda: '"event": "stopping"' in daemon.log(), "the daemon to stop")
                assert daemon.process.poll() is None
                blocker.execute("ROLLBACK")
                response = http.client.HTTPResponse(conn)
                response.begin()
                answer = json.loads(response.read())
        finally:
            blocker.close()
        assert response.status == 201, answer
        assert answer["user"] == "alice"
        assert answer["generation"] == 1
        assert daemon.stop() == 0
        log = daemon.log()
    assert '"event": "stopped"' in log
    assert not home.socket.exists()
    with contextlib.closing(sqlite3.connect(home.db)) as db:
        assert db.execute("SELECT user_name FROM grants").fetchall() == [("alice",)]


def test_a_burst_of_connections_waits_in_the_backlog_instead_of_being_refused(
    tmp_path: Path, log_dir: Path
) -> None:
    """While the daemon accepts nothing (SIGSTOP), 1,000 callers can still connect and queue.

    asyncio re-listens with aiohttp's default backlog of 128 unless told otherwise; a caller
    past the queue gets EAGAIN, which asyncio's connect mistakes for success and the caller then
    fails with "Transport endpoint is not connected".
    """
    burst = min(1000, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    assert burst > 128, "net.core.somaxconn is too small for this test to mean anything"
    home = make_home(tmp_path)
    with running_daemon(home, log_dir) as daemon:
        callers: list[socket.socket] = []
        refused = 0
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            for _ in range(burst):
                caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                caller.setblocking(False)
                callers.append(caller)
                try:
                    caller.connect(str(home.socket))
                except BlockingIOError:
                    refused += 1
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        for caller in callers:
            caller.close()
        assert refused == 0, f"{refused} of {burst} connections were refused"
        assert request(home.socket, "GET", "/healthz").status == 200


def test_sigterm_on_an_idle_daemon_exits_0_and_removes_the_socket(
    tmp_path: Path, log_dir: Path
) -> None:
    """SIGTERM stops an idle daemon promptly: exit 0, "stopped" logged, socket file gone."""
    home = make_home(tmp_path)
    with running_daemon(home, log_dir) as daemon:
        started = time.monotonic()
        daemon.terminate()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 5
        log = daemon.log()
    assert '"event": "stopped"' in log
    assert not home.socket.exists()


def test_a_stale_socket_file_is_replaced(tmp_path: Path, log_dir: Path) -> None:
    """A socket file nobody listens on (left by a crash) is removed and the daemon starts."""
    home = make_home(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home.socket))
    stale.close()
    assert stat.S_ISSOCK(home.socket.lstat().st_mode)
    with running_daemon(home, log_dir):
        assert request(home.socket, "GET", "/healthz").status == 200
        assert stat.S_IMODE(home.socket.lstat().st_mode) == 0o600


def test_a_live_socket_is_not_stolen(tmp_path: Path, log_dir: Path) -> None:
    """A second daemon on the same socket exits 1 and the first keeps serving on its socket."""
    home = make_home(tmp_path)
    with running_daemon(home, log_dir, name="first"):
        inode = home.socket.lstat().st_ino
        code, log = failed_start(home, log_dir, name="second")
        assert code == 1, log
        assert "another process is already serving" in log
        assert home.socket.lstat().st_ino == inode
        assert request(home.socket, "GET", "/healthz").status == 200


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path, log_dir: Path) -> None:
    """A regular file at the socket path makes serve exit 1 and keeps the file."""
    home = make_home(tmp_path)
    home.socket.write_text("not a socket")
    code, log = failed_start(home, log_dir)
    assert code == 1, log
    assert "is not a socket" in log
    assert home.socket.read_text() == "not a socket"


def test_a_wrong_keyring_refuses_to_start_and_changes_nothing(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """With another keyring the daemon exits 1, says so, and leaves the database bytes alone."""
    home = make_home(tmp_path)
    with running_daemon(home, log_dir, name="first"):
        _import(home, new_secret)
    home.generate_keys()
    before = home.db_digest()
    code, log = failed_start(home, log_dir, name="wrong-key")
    assert code == 1, log
    assert "does not open the store" in log
    assert "nothing was changed" in log
    assert home.db_digest() == before
    assert not home.socket.exists()


async def test_the_keyring_is_checked_before_any_migration_runs(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """A store left at an older revision stays there, byte for byte, when the keyring is wrong."""
    home = make_home(tmp_path)
    engine = create_engine(home.store_url)
    try:
        await upgrade(engine, "0001")
        # Written by hand in revision 0001's shape: today's repository writes newer columns.
        now = datetime.now(UTC).replace(tzinfo=None)
        sealed = home.keyring().seal(
            new_secret("rt"), table="grants", row_id="row1", column="refresh_token"
        )
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO grants (id, provider, user_name, state, refresh_token, key_id,"
                    " generation, created_at, updated_at) VALUES ('row1', 'techniek', 'alice',"
                    " 'active', :sealed, :key_id, 1, :now, :now)"
                ),
                {"sealed": sealed, "key_id": home.keyring().primary, "now": now},
            )
    finally:
        await engine.dispose()
    right_keys = home.keyring()
    home.generate_keys()
    before = home.db_digest()
    code, log = failed_start(home, log_dir, name="wrong-key-old-schema")
    assert code == 1, log
    assert "does not open the store" in log
    assert home.db_digest() == before
    engine = create_engine(home.store_url)
    try:
        assert await current_revision(engine) == "0001"
    finally:
        await engine.dispose()
    write_keyring(home.key_file, right_keys, replace=True)
    with running_daemon(home, log_dir, name="right-key"):
        pass
    engine = create_engine(home.store_url)
    try:
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()


def test_a_missing_key_file_refuses_to_start_and_creates_no_database(
    tmp_path: Path, log_dir: Path
) -> None:
    """Without a keyring the daemon exits 1 naming `token-broker keys generate`; no db appears."""
    home = Home(tmp_path)
    home.write_config()
    code, log = failed_start(home, log_dir)
    assert code == 1, log
    assert "token-broker keys generate" in log
    assert str(home.key_file) in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "logs"]


def test_a_key_file_readable_by_others_refuses_to_start(tmp_path: Path, log_dir: Path) -> None:
    """A keyring file with mode 0644 makes serve exit 1 with `chmod 600` in the error."""
    home = Home(tmp_path)
    home.write_config()
    write_keyring(home.key_file, Keyring.generate(datetime.now(UTC)), replace=False)
    home.key_file.chmod(0o644)
    code, log = failed_start(home, log_dir)
    assert code == 1, log
    assert f"chmod 600 {home.key_file}" in log
    assert not home.db.exists()


def test_a_tcp_port_in_use_is_a_clean_startup_error(tmp_path: Path, log_dir: Path) -> None:
    """A metrics port another process holds: one startup_failed line naming the key, exit 1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        home = make_home(tmp_path, metrics=f"127.0.0.1:{port}")
        code, log = failed_start(home, log_dir, name="port-in-use")
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port} (server.metrics)" in log
    assert "Traceback" not in log


def keys_rotate(home: Home) -> None:
    """Run `token-broker keys rotate` on the home's config; it must succeed."""
    rotated = subprocess.run(
        [sys.executable, "-m", "broker", "-c", str(home.config), "keys", "rotate"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert rotated.returncode == 0, rotated.stderr


def test_readyz_fails_when_keys_rotated_under_a_copied_keyring(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """A keyring rotated behind a daemon reading a copy (LoadCredential): 503; the admin views
    still answer (they open no sealed value); what must open the re-sealed grant is a logged 500."""
    home = make_home(tmp_path)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    copy = credentials / "token-broker-keys"
    copy.write_bytes(home.key_file.read_bytes())
    copy.chmod(0o600)
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    with running_daemon(home, log_dir, env=env) as daemon:
        body = {
            "provider": "techniek",
            "user": "alice",
            "refresh_token": new_secret("refresh"),
            "access_token": new_secret("access"),
            "expires_in": 3600,
        }
        assert request(home.socket, "POST", "/v1/grants", body).status == 201
        assert request(home.socket, "GET", "/readyz").status == 200
        keys_rotate(home)
        ready = request(home.socket, "GET", "/readyz")
        assert ready.status == 503
        [problem] = ready.json()["problems"]
        assert problem.startswith("keys: ")
        assert problem.endswith("; restart the daemon")
        shown = request(home.socket, "GET", "/v1/grants/techniek/alice")
        assert (shown.status, shown.json()["state"]) == (200, "active")
        listed = request(home.socket, "GET", "/v1/grants")
        assert [g["user"] for g in listed.json()] == ["alice"]
        # Replacing the re-sealed grant reads it, and fails; the log says why, as promised.
        body["refresh_token"], body["force"] = new_secret("refresh"), True
        assert request(home.socket, "POST", "/v1/grants", body).status == 500
        assert '"event": "request_failed"' in daemon.log()


def test_keys_rotated_under_a_daemon_reading_the_key_file_are_taken_up_at_once(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """`keys rotate` next to a daemon that reads the keyring file itself: it stays ready, and
    what it seals from then on (a grant imported after) is sealed with the new primary key."""
    home = make_home(tmp_path)

    def grant(user: str) -> dict[str, object]:
        return {
            "provider": "techniek",
            "user": user,
            "refresh_token": new_secret("refresh"),
            "access_token": new_secret("access"),
            "expires_in": 3600,
        }

    def key_ids() -> dict[str, str]:
        with contextlib.closing(sqlite3.connect(home.db)) as db:
            return dict(db.execute("SELECT user_name, key_id FROM grants").fetchall())

    with running_daemon(home, log_dir) as daemon:
        assert request(home.socket, "POST", "/v1/grants", grant("alice")).status == 201
        assert request(home.socket, "GET", "/readyz").status == 200
        keys_rotate(home)
        primary = load_keyring(home.key_file).primary
        assert key_ids() == {"alice": primary}
        ready = request(home.socket, "GET", "/readyz")
        assert ready.status == 200, ready.body
        assert request(home.socket, "POST", "/v1/grants", grant("bob")).status == 201
        assert key_ids() == {"alice": primary, "bob": primary}
        assert request(home.socket, "GET", "/v1/grants/techniek/alice").status == 200
        assert '"event": "keyring_reloaded"' in daemon.log()


async def test_a_slow_stop_names_what_it_waits_for() -> None:
    """The `still_stopping` report names each task and the coroutines it is suspended in."""

    async def inner() -> None:
        await asyncio.sleep(10)

    async def outer() -> None:
        await inner()

    tasks = Tasks()
    task = tasks.spawn(outer(), "refresh techniek/alice")
    await asyncio.sleep(0)
    try:
        described = _awaiting(task)
    finally:
        await tasks.cancel_all()
    assert described.startswith("refresh techniek/alice: ")
    assert "outer" in described
    assert "inner" in described
