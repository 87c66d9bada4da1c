"""Shared tooling for the rotation acceptance tests against the real django-oauth-toolkit IdP.

`Installation` is one store (a SQLite file) and one keyring in a short directory under /tmp
(a Unix socket path must fit in 108 bytes); `Installation.broker(name)` writes a config for one
`token-broker serve` process on it — a real provider at the test IdP, a callback listener, a
metrics listener and `[refresh]` settings — and returns a `BrokerProcess`: the subprocess
(`tests.daemon.DaemonProcess`, stderr in the test's `log_dir`) plus an aiohttp session on its
socket. Several brokers on one installation share the store and the keys, as two daemons on one
host would.

What the tests measure comes from outside the broker: the IdP's /test/stats and userinfo, the
broker's API, its /metrics, its JSON log lines (`log_events`), and, for the number of refreshes
in flight at once, the broker process's own TCP connections to the IdP's port, sampled from
/proc (`IdpConnectionSampler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from broker.crypto import load_keyring
from broker.store.engine import create_engine
from broker.store.repository import GrantRepository
from tests import conftest
from tests.daemon import DaemonProcess, Home, free_port
from tests.idp.browser import login
from tests.idp.fixture import DjangoIdP

PROVIDER = "techniek"
CALLBACK_PATH = "/oauth-callback/"
# DOT ignores the port of an http://127.0.0.1 redirect URI, so this admits every broker's port.
REGISTERED_REDIRECT = f"http://127.0.0.1{CALLBACK_PATH}"
SCOPES = ("openid", "profile", "FGO", "FGOWS")
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=20)
LOGIN_CONCURRENCY = 5


def users(count: int) -> dict[str, str]:
    """`count` IdP users u00, u01, ... with their passwords."""
    return {f"u{i:02d}": f"u{i:02d}-password" for i in range(count)}


def remember_secret(value: str) -> None:
    """Add a real token to the session's end-of-run leak scan (tests/conftest.py)."""
    conftest.SECRETS.add(value)


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    """The `[refresh]` table of a broker config."""

    lifetime_fraction: float = 0.5
    min_margin: str = "1s"
    jitter: float = 0.1
    max_concurrency: int = 8

    def toml(self) -> str:
        return (
            "[refresh]\n"
            f"lifetime_fraction = {self.lifetime_fraction}\n"
            f"min_margin = {json.dumps(self.min_margin)}\n"
            f"jitter = {self.jitter}\n"
            f"max_concurrency = {self.max_concurrency}\n"
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole HTTP response from a broker."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class BrokerProcess:
    """One `token-broker serve` subprocess of an installation, and a client of its socket."""

    def __init__(
        self,
        home: Home,
        log_dir: Path,
        *,
        name: str,
        callback_port: int | None,
        metrics_port: int,
    ) -> None:
        self.home = home
        self.log_dir = log_dir
        self.name = name
        self.callback_port = callback_port
        self.metrics_port = metrics_port
        self.incarnations: list[DaemonProcess] = []
        self._session: aiohttp.ClientSession | None = None

    def configure(
        self,
        installation: Installation,
        *,
        refresh: RefreshSettings,
        refresh_grace: str,
        redirect_uri: str,
    ) -> None:
        """(Re)write this broker's config; a restart picks it up."""
        callback = "" if self.callback_port is None else f"127.0.0.1:{self.callback_port}"
        idp = installation.idp
        self.refresh_settings, self.refresh_grace, self.redirect_uri = (
            refresh,
            refresh_grace,
            redirect_uri,
        )
        self.home.config.write_text(
            f"""[server]
socket = {json.dumps(str(self.home.socket))}
socket_mode = "0600"
callback = {json.dumps(callback)}
metrics = "127.0.0.1:{self.metrics_port}"

[store]
url = {json.dumps(installation.store_url)}
key_file = {json.dumps(str(installation.key_file))}

{refresh.toml()}
[providers.{PROVIDER}]
issuer = {json.dumps(idp.issuer)}
client_id = {json.dumps(idp.client_id)}
scopes = {json.dumps(list(SCOPES))}
redirect_uri = {json.dumps(redirect_uri)}
refresh_grace = {json.dumps(refresh_grace)}
"""
        )

    # -- the process ----------------------------------------------------------------------

    @property
    def process(self) -> DaemonProcess:
        """The current incarnation."""
        assert self.incarnations, "the broker was never started"
        return self.incarnations[-1]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def socket(self) -> Path:
        return self.home.socket

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """Start a new incarnation (its own log file; `env` added to its environment, such as
        a fake clock's) and wait until /healthz answers."""
        index = len(self.incarnations)
        daemon = DaemonProcess(
            self.home,
            self.log_dir,
            name=f"{self.name}-{index:02d}",
            env={"TOKEN_BROKER_LOG_LEVEL": "info", **(env or {})},
        )
        self.incarnations.append(daemon)
        daemon.start()
        daemon.wait_until_serving()

    def kill(self) -> None:
        """SIGKILL the current incarnation's pid (only it) and reap it."""
        daemon = self.process
        daemon.process.kill()  # Popen.kill: SIGKILL to this one pid
        daemon.process.wait(10)
        daemon.stop()  # already exited: only closes its log file

    def stop(self) -> int:
        """SIGTERM the current incarnation and wait; its exit code."""
        return self.process.stop()

    @property
    def running(self) -> bool:
        return bool(self.incarnations) and self.process.process.poll() is None

    def log(self) -> str:
        """Every incarnation's log, in order."""
        return "".join(daemon.log() for daemon in self.incarnations)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events of every incarnation (named `name`, when given)."""
        return log_events(self.log(), name)

    # -- HTTP over the socket -------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(path=str(self.socket), limit=0, force_close=True)
            self._session = aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        method: str,
        path: str,
        body: object | None = None,
        wait: aiohttp.ClientTimeout | None = None,
    ) -> Reply:
        async with self.session().request(
            method, "http://broker" + path, json=body, timeout=wait or HTTP_TIMEOUT
        ) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.read())

    async def token(self, user: str, min_ttl: int | None = None) -> Reply:
        query = "" if min_ttl is None else f"?min_ttl={min_ttl}"
        reply = await self.call("GET", f"/v1/tokens/{PROVIDER}/{user}{query}")
        if reply.status == 200:
            remember_secret(reply.json()["access_token"])
        return reply

    async def grants(self) -> dict[str, dict[str, Any]]:
        """GET /v1/grants, by user."""
        reply = await self.call("GET", "/v1/grants")
        assert reply.status == 200, reply.body
        return {g["user"]: g for g in reply.json()}

    async def refresh(self, user: str, seconds: float | None = None) -> Reply:
        """POST .../refresh: the broker answers once the refresh ended (or after its own wait,
        35 s); give longer `seconds` when the provider is made slow on purpose."""
        wait = None if seconds is None else aiohttp.ClientTimeout(total=seconds)
        return await self.call("POST", f"/v1/grants/{PROVIDER}/{user}/refresh", wait=wait)

    async def log_in(self, user: str, password: str) -> None:
        """Log `user` in through the real flow: POST /v1/logins, the IdP's forms, the callback."""
        reply = await self.call("POST", "/v1/logins", {"provider": PROVIDER, "user": user})
        assert reply.status == 201, reply.body
        started = reply.json()
        result = await login(started["authorize_url"], user, password, follow=True)
        assert result.callback_status == 200, result.callback_body
        status = await self.call("GET", f"/v1/logins/{started['login_id']}")
        assert status.json()["state"] == "complete", status.body

    async def log_in_all(
        self, accounts: Mapping[str, str], concurrency: int = LOGIN_CONCURRENCY
    ) -> None:
        """Log every account in, `concurrency` at a time."""
        limit = asyncio.Semaphore(concurrency)

        async def one(user: str, password: str) -> None:
            async with limit:
                await self.log_in(user, password)

        await asyncio.gather(*(one(u, p) for u, p in accounts.items()))

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The broker's /metrics as {(sample name, sorted labels): value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        async with (
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
            session.get(url) as resp,
        ):
            text = await resp.text()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


class Installation:
    """One store and keyring; brokers on it share both (configs differ in socket and ports)."""

    def __init__(
        self, root: Path, idp: DjangoIdP, log_dir: Path, store_url: str | None = None
    ) -> None:
        self.root = root
        self.idp = idp
        self.log_dir = log_dir
        self.db = root / "broker.db"
        self.store_url = store_url or f"sqlite:///{self.db}"
        self.key_file = root / "keys"
        Home(root).generate_keys()
        self.brokers: list[BrokerProcess] = []

    def broker(
        self,
        name: str,
        *,
        refresh: RefreshSettings,
        refresh_grace: str = "0s",
        callback: bool = True,
        redirect_port: int | None = None,
    ) -> BrokerProcess:
        """A broker process (not started) on this installation, with its own config."""
        home = Home(self.root / name)
        home.root.mkdir()
        callback_port = free_port() if callback else None
        port = callback_port or redirect_port
        assert port is not None, "a broker without a callback needs another broker's port"
        broker = BrokerProcess(
            home,
            self.log_dir,
            name=name,
            callback_port=callback_port,
            metrics_port=free_port(),
        )
        broker.configure(
            self,
            refresh=refresh,
            refresh_grace=refresh_grace,
            redirect_uri=f"http://127.0.0.1:{port}{CALLBACK_PATH}",
        )
        self.brokers.append(broker)
        return broker

    async def remember_stored_secrets(self) -> int:
        """Add every token the store holds now to the session's leak scan; how many."""
        if self.store_url.startswith("sqlite") and not self.db.exists():
            return 0
        engine = create_engine(self.store_url)
        try:
            grants = await GrantRepository(engine, load_keyring(self.key_file)).all()
        finally:
            await engine.dispose()
        count = 0
        for grant in grants:
            for secret in (
                grant.tokens.refresh_token,
                grant.tokens.access_token,
                grant.tokens.id_token,
            ):
                if secret is not None:
                    remember_secret(secret.reveal())
                    count += 1
        return count


@contextlib.asynccontextmanager
async def installation(
    idp: DjangoIdP, log_dir: Path, store_url: str | None = None
) -> AsyncIterator[Installation]:
    """An installation (a SQLite file unless `store_url` names another store); every broker
    still running at the end gets SIGTERM and must exit 0."""
    root = Path(tempfile.mkdtemp(prefix="tb-rot-"))
    inst = Installation(root, idp, log_dir, store_url)
    failures: list[str] = []
    try:
        yield inst
    finally:
        for broker in inst.brokers:
            await broker.close()
            if broker.running:
                code = broker.stop()
                if code != 0:
                    failures.append(f"{broker.name} exited with {code}")
        await inst.remember_stored_secrets()
        shutil.rmtree(root, ignore_errors=True)
    assert not failures, failures


# -- the IdP, seen from the test --------------------------------------------------------------


class UserInfo:
    """Asynchronous userinfo checks at the IdP (never blocking the test's event loop)."""

    def __init__(self, idp: DjangoIdP) -> None:
        self.url = idp.userinfo_endpoint
        self._session = aiohttp.ClientSession(
            timeout=HTTP_TIMEOUT, connector=aiohttp.TCPConnector(force_close=True, limit=16)
        )

    async def status(self, access_token: str) -> int:
        headers = {"Authorization": f"Bearer {access_token}"}
        async with self._session.get(self.url, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def close(self) -> None:
        await self._session.close()


def stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, int]:
    """The change of the IdP's scalar counters between two /test/stats snapshots."""
    return {
        key: int(value) - int(before.get(key, 0))
        for key, value in after.items()
        if isinstance(value, int)
    }


# -- the broker's log ---------------------------------------------------------------------------


def log_events(text: str, name: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines of `text` (event `name` only, when given), with `at` in epoch seconds."""
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if name is not None and event.get("event") != name:
            continue
        stamp = event.get("timestamp")
        if isinstance(stamp, str):
            event["at"] = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        events.append(event)
    return events


@dataclass(frozen=True, slots=True)
class RefreshCall:
    """One call to the token endpoint, as the broker logged it (event "refresh")."""

    user: str
    start: float  # epoch seconds: the log time minus the call's duration
    end: float
    outcome: str
    generation: int


def refresh_calls(events: Iterable[dict[str, Any]]) -> list[RefreshCall]:
    """The "refresh" events as call intervals, ordered by start."""
    calls = []
    for event in events:
        if event.get("event") != "refresh" or "at" not in event:
            continue
        end = float(event["at"])
        calls.append(
            RefreshCall(
                user=str(event["grant"]).partition("/")[2],
                start=end - float(event["duration_ms"]) / 1000,
                end=end,
                outcome=str(event["outcome"]),
                generation=int(event["generation"]),
            )
        )
    return sorted(calls, key=lambda c: c.start)


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    spans = list(intervals)
    points = sorted(
        [(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans],
        key=lambda p: (p[0], p[1]),  # an end before a start at the same instant
    )
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best


# -- refreshes in flight, seen on the wire ------------------------------------------------------


@dataclass
class IdpConnectionSampler:
    """Samples how many ESTABLISHED TCP connections process `pid` holds to 127.0.0.1:`port`.

    The broker closes every IdP connection after its response (force_close), and a refresh is
    one POST on one connection, so with the token endpoint holding each answer back
    (/test/faults token_delay) the count is the number of refreshes in flight at the IdP.
    """

    pid: int
    port: int
    interval: float = 0.01
    samples: int = 0
    maximum: int = 0
    histogram: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def count(self) -> int:
        inodes = set()
        with contextlib.suppress(FileNotFoundError):
            for fd in Path(f"/proc/{self.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = str(fd.readlink())
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        wanted = f"0100007F:{self.port:04X}"
        total = 0
        with Path("/proc/net/tcp").open() as table:
            next(table)
            for line in table:
                parts = line.split()
                # sl local_address rem_address st ... inode (index 9)
                if parts[2] == wanted and parts[3] == "01" and parts[9] in inodes:
                    total += 1
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self.count()
            self.samples += 1
            self.maximum = max(self.maximum, value)
            self.histogram[value] = self.histogram.get(value, 0) + 1
            self._stop.wait(self.interval)

    def __enter__(self) -> IdpConnectionSampler:
        self._thread = threading.Thread(target=self._run, name="idp-conn-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


@contextlib.contextmanager
def timed(label: str, into: dict[str, float]) -> Iterator[None]:
    """Record the wall time of a block under `label`."""
    started = time.monotonic()
    try:
        yield
    finally:
        into[label] = round(time.monotonic() - started, 1)


def report(title: str, numbers: Mapping[str, object]) -> None:
    """Print a test's numbers on one line (visible with -s, and kept in the junit output)."""
    print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)
