"""A real `token-broker serve` in a subprocess, for the daemon and CLI tests.

`Home` lays out a config, a keyring and a database path in one directory. `running_daemon`
starts `python -m broker serve -c CONFIG` with its stderr in the test's `log_dir` (scanned for
secrets when the session ends), waits until /healthz answers on the socket, and on exit sends
SIGTERM to that one pid and asserts a clean exit. `request` speaks HTTP over the Unix socket
with the standard library only, so what it sees is what any client would see.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from broker.crypto import Keyring, load_keyring, write_keyring
from broker.store.engine import create_engine
from broker.store.migrate import upgrade
from broker.store.repository import GrantRepository

START_TIMEOUT = 15.0  # seconds for a daemon to answer /healthz, or to exit when it must fail
STOP_TIMEOUT = 15.0  # seconds for a daemon to exit after SIGTERM
LOG_TAIL_LINES = 40
PROVIDERS = ("techniek", "netid")
# Variables of the test runner's environment that would change how a daemon starts.
_ISOLATED_ENV = (
    "NOTIFY_SOCKET",
    "CREDENTIALS_DIRECTORY",
    "TOKEN_BROKER_CONFIG",
    "TOKEN_BROKER_LOG_LEVEL",
)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The runner's environment without the variables that steer a daemon, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATED_ENV}
    return env | dict(extra or {})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Home:
    """One broker installation inside a test's directory."""

    root: Path

    @property
    def config(self) -> Path:
        """The config file."""
        return self.root / "config.toml"

    @property
    def socket(self) -> Path:
        """The API's Unix socket."""
        return self.root / "broker.sock"

    @property
    def key_file(self) -> Path:
        """The keyring file."""
        return self.root / "keys"

    @property
    def db(self) -> Path:
        """The SQLite database file."""
        return self.root / "broker.db"

    @property
    def store_url(self) -> str:
        """The store URL of the database file."""
        return f"sqlite:///{self.db}"

    def write_config(self, *, socket_mode: str = "0600", metrics: str = "") -> Path:
        """Write a config with both test providers; no callback listener; metrics off by default."""
        providers = "".join(
            f"""
[providers.{name}]
issuer = "https://idp.example.nl/{name}"
client_id = "broker-test"
scopes = ["openid", "profile"]
redirect_uri = "http://localhost:8000/oauth-callback/{name}/"
"""
            for name in PROVIDERS
        )
        self.config.write_text(
            f"""
[server]
socket = {json.dumps(str(self.socket))}
socket_mode = "{socket_mode}"
callback = ""
metrics = {json.dumps(metrics)}

[store]
url = {json.dumps(self.store_url)}
key_file = {json.dumps(str(self.key_file))}
{providers}"""
        )
        return self.config

    def generate_keys(self) -> Keyring:
        """Write a fresh single-key keyring (mode 0600), replacing any keyring file there."""
        keyring = Keyring.generate(datetime.now(UTC))
        write_keyring(self.key_file, keyring, replace=True)
        return keyring

    def keyring(self) -> Keyring:
        """The keyring as the file holds it now."""
        return load_keyring(self.key_file)

    def db_digest(self) -> str:
        """sha256 over the database file and its WAL (when one holds anything)."""
        digest = hashlib.sha256()
        for path in (self.db, self.db.with_name(self.db.name + "-wal")):
            if path.exists() and path.stat().st_size:
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()


def make_home(root: Path, *, socket_mode: str = "0600", metrics: str = "") -> Home:
    """A Home with its config and a fresh keyring written."""
    home = Home(root)
    home.write_config(socket_mode=socket_mode, metrics=metrics)
    home.generate_keys()
    return home


@contextlib.asynccontextmanager
async def open_store(home: Home) -> AsyncIterator[GrantRepository]:
    """The home's store, migrated, opened with the keyring file's keys; disposed on exit."""
    engine = create_engine(home.store_url)
    try:
        await upgrade(engine)
        yield GrantRepository(engine, home.keyring())
    finally:
        await engine.dispose()


# -- HTTP over the Unix socket ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete HTTP response."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("broker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(
    sock: Path, method: str, path: str, body: object | None = None, timeout: float = 10.0
) -> Reply:
    """Send one request on a new connection to the Unix socket `sock`; the whole response."""
    conn = _UnixConnection(sock, timeout)
    headers = {}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, dict(response.getheaders()), data)
    finally:
        conn.close()


# -- the daemon process ----------------------------------------------------------------------


class DaemonProcess:
    """One `python -m broker serve` subprocess; only this object ever signals its pid."""

    def __init__(
        self, home: Home, log_dir: Path, *, name: str = "daemon", env: Mapping[str, str] | None
    ) -> None:
        self.home = home
        self.log_path = log_dir / f"{name}.stderr.log"
        self._env = clean_env(env)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._terminated = False

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The running (or exited) subprocess."""
        assert self._process is not None, "the daemon was not started"
        return self._process

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.process.pid

    def start(self) -> None:
        """Start the daemon; do not wait for it."""
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "-c", str(self.home.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=self._env,
            cwd=self.home.root,
        )

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self) -> str:
        """The last lines of the log, for failure messages."""
        return "\n".join(self.log().splitlines()[-LOG_TAIL_LINES:])

    def wait_until_serving(self, timeout: float = START_TIMEOUT) -> None:
        """Return once /healthz answers 200 on the socket; fail with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise AssertionError(
                    f"daemon exited with {code} while starting:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                if request(self.home.socket, "GET", "/healthz", timeout=1.0).status == 200:
                    return
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"daemon did not answer /healthz in {timeout}s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        """The exit code once the daemon has exited on its own; fail if it keeps running."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"daemon still runs after {timeout}s:\n{self.log_tail()}"
            ) from None

    def terminate(self) -> None:
        """Send SIGTERM to the daemon's pid once, if it still runs."""
        # Once: a second SIGTERM that lands after the event loop closed (and its handler is
        # gone) would kill a daemon that was exiting cleanly.
        if not self._terminated and self.process.poll() is None:
            self._terminated = True
            os.kill(self.pid, signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait, and return the exit code; SIGKILL (to this pid) if it hangs."""
        self.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"daemon ignored SIGTERM for {timeout}s:\n{self.log_tail()}"
            ) from None
        finally:
            if self._log is not None:
                self._log.close()
        return code


@contextlib.contextmanager
def running_daemon(
    home: Home,
    log_dir: Path,
    *,
    name: str = "daemon",
    env: Mapping[str, str] | None = None,
    wait: bool = True,
) -> Iterator[DaemonProcess]:
    """A started daemon (serving, unless `wait` is false); on exit, SIGTERM and exit code 0."""
    daemon = DaemonProcess(home, log_dir, name=name, env=env)
    daemon.start()
    try:
        if wait:
            daemon.wait_until_serving()
        yield daemon
    except BaseException:
        with contextlib.suppress(AssertionError):
            daemon.stop()
        raise
    code = daemon.stop()
    assert code == 0, f"daemon exited with {code}:\n{daemon.log_tail()}"


def failed_start(
    home: Home, log_dir: Path, *, name: str = "daemon", env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run a daemon that must refuse to start; its exit code and log."""
    daemon = DaemonProcess(home, log_dir, name=name, env=env)
    daemon.start()
    try:
        code = daemon.wait_exit()
    finally:
        daemon.stop()
    return code, daemon.log()
