"""A whole broker for the login tests: the daemon's own composition root, run in-process.

`serving_broker` writes a config (providers given by the test, a callback listener on a free
loopback port), a keyring and a store, and runs `Daemon.run()` on the test's event loop with a
clock the test moves (`Broker.clock.advance`); its logs go to a file under `log_dir`, as
`serve`'s do, so the session's secret scan reads them and a test can too. With
`process=True` the same broker runs as a real `python -m broker serve` subprocess instead (its
clock cannot be moved). Either way a test talks to it as any client would: HTTP over the Unix
socket, the IdP's redirect to the callback port.

`Broker.stored_grant` and `Broker.sealed_verifier` open the store with the keyring file, so a
test can check what was sealed; they are the test's inspection, not an API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO, cast
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from sqlalchemy import select

from broker.config import load_config
from broker.crypto import Keyring, load_keyring, write_keyring
from broker.daemon import Daemon
from broker.log import configure_logging
from broker.model import Grant
from broker.store.engine import create_engine
from broker.store.repository import GrantRepository
from broker.store.tables import logins
from broker.tasks import Tasks
from tests.daemon import Home, free_port, running_daemon
from tests.idp.browser import LoginResult
from tests.idp.fixture import DjangoIdP, start_django_idp

CALLBACK_PATH = "/oauth-callback/"
# What the IdPs register: DOT and the netID fakes ignore the port of a 127.0.0.1 redirect URI
# (RFC 8252), so this admits whichever port the broker's callback listener got.
REGISTERED_REDIRECT = f"http://127.0.0.1{CALLBACK_PATH}"
TECHNIEK_SCOPES = ("openid", "profile", "FGO", "FGOWS")
SERVE_TIMEOUT = 15.0  # seconds for a broker to answer /healthz, or to stop
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15)
POLL_INTERVAL = 0.02


class Clock:
    """The wall clock plus an offset the test moves; ID tokens from real IdPs stay checkable."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        """Move the broker's time forward."""
        self.offset += timedelta(seconds=seconds)


class _AppendingLog:
    """A text stream that appends each write to a file: safe to use after the test ends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, text: str) -> int:
        with self.path.open("a", encoding="utf-8") as out:
            return out.write(text)

    def flush(self) -> None:
        """Every write is already on disk."""

    def isatty(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole HTTP response from the broker."""

    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.text)


@dataclass(frozen=True, slots=True)
class Login:
    """A started login: what POST /v1/logins answered."""

    id: str
    authorize_url: str
    expires_at: str

    @property
    def params(self) -> dict[str, list[str]]:
        """The authorize URL's query parameters, every value of each."""
        return parse_qs(urlsplit(self.authorize_url).query, keep_blank_values=True)

    def param(self, name: str) -> str:
        """The single value of one authorize URL parameter."""
        values = self.params[name]
        assert len(values) == 1, f"{name} appears {len(values)} times"
        return values[0]


@dataclass
class Broker:
    """A serving broker and the ways a test reaches it."""

    root: Path
    config_path: Path
    socket: Path
    key_file: Path
    store_url: str
    callback_port: int
    log_path: Path
    clock: Clock
    session: aiohttp.ClientSession = field(repr=False)

    @property
    def redirect_uri(self) -> str:
        """The redirect URI every provider of this broker is configured with."""
        return f"http://127.0.0.1:{self.callback_port}{CALLBACK_PATH}"

    async def call(self, method: str, path: str, body: object | None = None) -> Reply:
        """One request over the Unix socket."""
        async with self.session.request(method, "http://broker" + path, json=body) as response:
            return Reply(response.status, dict(response.headers), await response.text())

    async def start_login(self, provider: str, user: str, *, force: bool = False) -> Login:
        """POST /v1/logins; fails the test unless it answers 201."""
        reply = await self.call(
            "POST", "/v1/logins", {"provider": provider, "user": user, "force": force}
        )
        assert reply.status == 201, reply.text
        body = reply.json()
        return Login(body["login_id"], body["authorize_url"], body["expires_at"])

    async def login_status(self, login_id: str) -> dict[str, Any]:
        """GET /v1/logins/{id}; fails the test unless it answers 200."""
        reply = await self.call("GET", f"/v1/logins/{login_id}")
        assert reply.status == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    async def grant(self, provider: str, user: str) -> Reply:
        """GET /v1/grants/{provider}/{user}."""
        return await self.call("GET", f"/v1/grants/{provider}/{user}")

    async def token(self, provider: str, user: str) -> Reply:
        """GET /v1/tokens/{provider}/{user}."""
        return await self.call("GET", f"/v1/tokens/{provider}/{user}")

    async def access_token(self, provider: str, user: str) -> str:
        """The access token the broker serves now; fails the test unless it serves one."""
        reply = await self.token(provider, user)
        assert reply.status == 200, reply.text
        value: str = reply.json()["access_token"]
        return value

    async def callback(self, url: str) -> Reply:
        """GET a redirect URL on the callback listener, as a browser arriving there would."""
        async with (
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as browser,
            browser.get(url, allow_redirects=False) as response,
        ):
            return Reply(response.status, dict(response.headers), await response.text())

    def log(self) -> str:
        """Everything the broker logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def assert_not_logged(self, *values: str | None) -> None:
        """None of these values (tokens, codes) appears anywhere in the broker's log."""
        text = self.log()
        assert text, "the broker logged nothing; the check would prove nothing"
        for value in values:
            assert value, "an empty value cannot be checked"
            assert value not in text, f"a secret of {len(value)} characters reached the log"

    async def stored_grant(self, provider: str, user: str) -> Grant | None:
        """The grant as the store holds it, opened with the keyring file."""
        engine = create_engine(self.store_url)
        try:
            return await GrantRepository(engine, load_keyring(self.key_file)).get(provider, user)
        finally:
            await engine.dispose()

    async def sealed_verifier(self, login_id: str) -> str | None:
        """The PKCE verifier sealed in a login row; None once the login has finished."""
        engine = create_engine(self.store_url)
        try:
            async with engine.connect() as conn:
                query = select(logins.c.code_verifier).where(logins.c.id == login_id)
                sealed = (await conn.execute(query)).scalar_one()
        finally:
            await engine.dispose()
        if sealed is None:
            return None
        keyring = load_keyring(self.key_file)
        return keyring.open(sealed, table="logins", row_id=login_id, column="code_verifier")

    def database_bytes(self) -> bytes:
        """The SQLite file and its WAL, raw: what a thief of the disk would read."""
        path = Path(self.store_url.removeprefix("sqlite:///"))
        wal = path.with_name(path.name + "-wal")
        return b"".join(p.read_bytes() for p in (path, wal) if p.exists())


def write_config(
    config: Path,
    *,
    socket: Path,
    store_url: str,
    key_file: Path,
    callback_port: int,
    providers: Mapping[str, Mapping[str, object]],
    callback: bool = True,
    refresh: Mapping[str, object] | None = None,
) -> None:
    """A config whose providers all redirect to this broker's callback listener (which
    `callback=False` switches off), with `refresh` as its [refresh] table when given."""
    tables = []
    for name, settings in providers.items():
        values = {"redirect_uri": f"http://127.0.0.1:{callback_port}{CALLBACK_PATH}", **settings}
        lines = [f"[providers.{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        tables.append("\n".join(lines))
    listen = f"127.0.0.1:{callback_port}" if callback else ""
    if refresh:
        tables.insert(
            0, "[refresh]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in refresh.items())
        )
    config.write_text(
        f"""[server]
socket = {json.dumps(str(socket))}
socket_mode = "0600"
callback = "{listen}"
metrics = ""

[store]
url = {json.dumps(store_url)}
key_file = {json.dumps(str(key_file))}

"""
        + "\n\n".join(tables)
        + "\n"
    )


def techniek(idp: DjangoIdP, **overrides: object) -> dict[str, object]:
    """The seed-000 provider at a django-oauth-toolkit test IdP."""
    return {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "scopes": list(TECHNIEK_SCOPES),
        **overrides,
    }


@contextlib.contextmanager
def _short_dir() -> Iterator[Path]:
    # A Unix socket path must fit in 108 bytes; pytest's tmp_path under a long test name may not.
    path = Path(tempfile.mkdtemp(prefix="tb-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _wait_serving(broker: Broker, alive: Any) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT
    while time.monotonic() < deadline:
        alive()
        with contextlib.suppress(aiohttp.ClientError, OSError):
            if (await broker.call("GET", "/healthz")).status == 200:
                return
        await asyncio.sleep(POLL_INTERVAL)
    raise AssertionError(f"the broker did not answer /healthz in {SERVE_TIMEOUT}s:\n{broker.log()}")


@contextlib.asynccontextmanager
async def serving_broker(
    root: Path,
    log_dir: Path,
    providers: Mapping[str, Mapping[str, object]],
    *,
    process: bool = False,
    callback: bool = True,
    refresh: Mapping[str, object] | None = None,
) -> AsyncIterator[Broker]:
    """A broker serving `providers` until the block ends (in-process unless `process`); see
    `write_config` for `callback` and `refresh`.

    The store and the keyring live in `root`: a second broker on the same `root` (with other
    providers, say) starts on what the first one left.
    """
    store_url, key_file = f"sqlite:///{root / 'broker.db'}", root / "keys"
    if not key_file.exists():
        write_keyring(key_file, Keyring.generate(datetime.now(UTC)), replace=False)
    with _short_dir() as short:
        home = Home(short)
        callback_port = free_port()
        write_config(
            home.config,
            socket=home.socket,
            store_url=store_url,
            key_file=key_file,
            callback_port=callback_port,
            providers=providers,
            callback=callback,
            refresh=refresh,
        )
        connector = aiohttp.UnixConnector(path=str(home.socket))
        async with aiohttp.ClientSession(connector=connector, timeout=HTTP_TIMEOUT) as session:
            broker = Broker(
                root=root,
                config_path=home.config,
                socket=home.socket,
                key_file=key_file,
                store_url=store_url,
                callback_port=callback_port,
                log_path=log_dir / ("daemon.stderr.log" if process else "broker.log"),
                clock=Clock(),
                session=session,
            )
            if process:
                async with _subprocess(broker, home, log_dir):
                    yield broker
            else:
                async with _in_process(broker):
                    yield broker


@contextlib.asynccontextmanager
async def _in_process(broker: Broker) -> AsyncIterator[None]:
    configure_logging(level="debug", json=True, stream=cast(TextIO, _AppendingLog(broker.log_path)))
    daemon = Daemon(load_config(broker.config_path), {}, broker.clock)
    run = Tasks().spawn(daemon.run(), "in-process daemon")

    def alive() -> None:
        if run.done():
            run.result()  # raises what stopped it
            raise AssertionError(f"the broker stopped while starting:\n{broker.log()}")

    try:
        await _wait_serving(broker, alive)
        yield
    finally:
        daemon.stopping.set()
        await asyncio.wait_for(run, SERVE_TIMEOUT)


@contextlib.asynccontextmanager
async def _subprocess(broker: Broker, home: Home, log_dir: Path) -> AsyncIterator[None]:
    env = {"TOKEN_BROKER_LOG_LEVEL": "debug"}
    with running_daemon(home, log_dir, env=env, wait=False) as daemon:

        def alive() -> None:
            code = daemon.process.poll()
            if code is not None:
                raise AssertionError(f"daemon exited with {code}:\n{daemon.log_tail()}")

        await _wait_serving(broker, alive)
        yield


# -- what tests check after a login ----------------------------------------------------------


def code_exchanges(idp: DjangoIdP) -> int:
    """How many authorization_code token requests the DOT IdP has seen."""
    return int(idp.stats()["token_requests"].get("authorization_code", 0))


async def assert_login_failed(broker: Broker, started: Login, *reasons: str) -> str:
    """The login reads as failed with an error naming every reason; its grant does not exist."""
    status = await broker.login_status(started.id)
    assert status["state"] == "failed", status
    error: str = status["error"]
    for reason in reasons:
        assert reason in error, f"{reason!r} not in {error!r}"
    provider, user = status["provider"], status["user"]
    assert (await broker.grant(provider, user)).status == 404
    assert (await broker.token(provider, user)).status == 404
    return error


def assert_failure_page(arrival: Reply | LoginResult, *words: str) -> None:
    """The callback answered 400 with a page that says why, in these words."""
    if isinstance(arrival, LoginResult):
        status, body = arrival.callback_status, arrival.callback_body or ""
    else:
        status, body = arrival.status, arrival.text
    assert status == 400, body
    assert "Login failed" in body
    for word in words:
        assert word in body, body


@pytest.fixture(scope="module")
def shared_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DjangoIdP]:
    """One django-oauth-toolkit IdP for a module's tests that neither stop nor fault it."""
    idp = start_django_idp(tmp_path_factory.mktemp("idp"), redirect_uris=[REGISTERED_REDIRECT])
    try:
        yield idp
    finally:
        idp.stop()
