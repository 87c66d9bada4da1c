"""SIGHUP reloads the config: clients, providers and required grants swap; a bad file is refused.

Every test runs a real `token-broker serve` subprocess and sends it a real SIGHUP after
rewriting its config file. The clients are recognised by bearer tokens on the loopback TCP
listener, so one root test process can play several callers. The in-flight test runs against
the real django-oauth-toolkit IdP, which holds one refresh answer back while the reload happens.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from broker.tasks import Tasks
from tests.daemon import DaemonProcess, Home, free_port, request, running_daemon
from tests.idp import fixture as idp_fixture
from tests.idp.fixture import DjangoIdPFactory
from tests.rotation_harness import (
    PROVIDER,
    REGISTERED_REDIRECT,
    RefreshSettings,
    UserInfo,
    installation,
    log_events,
    stats_delta,
)

django_idp_factory = idp_fixture.django_idp_factory
WAIT = 15.0  # seconds for a reload to show in the log


def provider_table(name: str, token_port: int, callback_path: str = "/oauth-callback/") -> str:
    """A provider whose endpoints are a closed loopback port: no refresh can succeed."""
    base = f"http://127.0.0.1:{token_port}/{name}"
    return f"""
[providers.{name}]
authorization_endpoint = "{base}/authorize"
token_endpoint = "{base}/token"
client_id = "broker-test"
scopes = ["profile"]
redirect_uri = "http://127.0.0.1:8000{callback_path}"
"""


def client_table(name: str, bearer: str, grants: Sequence[str], admin: bool = False) -> str:
    digest = hashlib.sha256(bearer.encode()).hexdigest()
    return f"""
[[clients]]
name = "{name}"
token_sha256 = "{digest}"
grants = {json.dumps(list(grants))}
admin = {"true" if admin else "false"}
"""


class Setup:
    """A broker home whose config the test rewrites between reloads."""

    def __init__(self, root: Path) -> None:
        self.home = Home(root)
        self.home.generate_keys()
        self.tcp_port = free_port()
        self.closed_port = free_port()  # nothing listens here

    def write(
        self,
        *,
        providers: Sequence[str] = ("techniek",),
        clients: str = "",
        required: Sequence[str] = (),
        extra: str = "",
        metrics: str = "",
        callback: str = "",
    ) -> None:
        self.home.config.write_text(
            f"""
[server]
socket = {json.dumps(str(self.home.socket))}
socket_mode = "0600"
tcp = "127.0.0.1:{self.tcp_port}"
callback = {json.dumps(callback)}
metrics = {json.dumps(metrics)}

[store]
url = {json.dumps(self.home.store_url)}
key_file = {json.dumps(str(self.home.key_file))}

[readiness]
required_grants = {json.dumps(list(required))}
{"".join(provider_table(p, self.closed_port, f"/oauth-callback/{p}/") for p in providers)}
{clients}
{extra}
"""
        )

    def import_grant(
        self, provider: str, user: str, new_secret: Callable[[str], str], expires_in: int = 3600
    ) -> int:
        body = {
            "provider": provider,
            "user": user,
            "refresh_token": new_secret("refresh"),
            "access_token": new_secret("access"),
            "expires_in": expires_in,
        }
        return request(self.home.socket, "POST", "/v1/grants", body).status


def reload(daemon: DaemonProcess, event: str) -> dict[str, Any]:
    """SIGHUP the daemon and return the next log event `event` it writes about it."""
    before = len(log_events(daemon.log(), event))
    os.kill(daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        events = log_events(daemon.log(), event)
        if len(events) > before:
            return events[before]
        time.sleep(0.02)
    raise AssertionError(f"no {event} after SIGHUP:\n{daemon.log_tail()}")


class KeepAlive:
    """One HTTP/1.1 connection to the TCP listener, kept open across requests."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.connect()
        self.local = self.conn.sock.getsockname()

    def get(self, path: str, bearer: str) -> int:
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {bearer}"})
        response = self.conn.getresponse()
        response.read()
        # The same TCP connection every time: the reload dropped no connection.
        assert self.conn.sock is not None
        assert self.conn.sock.getsockname() == self.local
        return response.status

    def close(self) -> None:
        self.conn.close()


def test_sighup_swaps_the_clients_for_open_connections_too(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """After SIGHUP a new client gets in and a narrowed one is refused, on an open connection."""
    setup = Setup(tmp_path)
    first, second = new_secret("bearer"), new_secret("bearer")
    setup.write(
        providers=("techniek", "netid"),
        clients=client_table("first", first, ["techniek/*"]),
    )
    with running_daemon(setup.home, log_dir) as daemon:
        assert setup.import_grant("techniek", "alice", new_secret) == 201
        connection = KeepAlive(setup.tcp_port)
        try:
            path = "/v1/tokens/techniek/alice"
            assert connection.get(path, first) == 200
            assert connection.get(path, second) == 401
            setup.write(
                providers=("techniek", "netid"),
                clients=client_table("first", first, ["netid/*"])
                + client_table("second", second, ["techniek/alice"]),
            )
            event = reload(daemon, "config_reloaded")
            assert event["clients"] == 2
            assert connection.get(path, first) == 403
            assert connection.get(path, second) == 200
        finally:
            connection.close()


def test_an_invalid_config_is_refused_whole_and_the_old_one_kept(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """A config with problems changes nothing: all its problems are logged, old clients work."""
    setup = Setup(tmp_path)
    bearer = new_secret("bearer")
    setup.write(clients=client_table("first", bearer, ["techniek/*"]))
    with running_daemon(setup.home, log_dir) as daemon:
        assert setup.import_grant("techniek", "alice", new_secret) == 201
        # Valid TOML with two problems, one of which would also drop the client.
        setup.write(extra='[refresh]\njitter = 5\ncolour = "blue"\n')
        refused = reload(daemon, "reload_refused")
        assert refused["problems"] == [
            "refresh.colour: unknown key",
            "refresh.jitter: must be at least 0 and less than 0.5, got 5.0",
        ]
        setup.home.config.write_text("this is [not toml")
        assert "TOML syntax error" in reload(daemon, "reload_refused")["problems"][0]
        # A NUL in a sink's owner, which the C library's lookup refuses with an exception.
        setup.write(
            extra='[[sinks]]\ngrant = "techniek/alice"\npath = "a.token"\nowner = "x\\u0000"\n'
        )
        assert reload(daemon, "reload_refused")["problems"][0] == (
            "sinks[0].owner: contains a NUL character (\\u0000)"
        )
        connection = KeepAlive(setup.tcp_port)
        try:
            assert connection.get("/v1/tokens/techniek/alice", bearer) == 200
        finally:
            connection.close()
        assert request(setup.home.socket, "GET", "/readyz").status == 200
        assert not log_events(daemon.log(), "config_reloaded")


def test_a_reload_adds_providers_and_names_settings_that_need_a_restart(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """A provider added by reload takes grants at once; a changed listener waits for a restart."""
    setup = Setup(tmp_path)
    setup.write()
    with running_daemon(setup.home, log_dir) as daemon:
        assert setup.import_grant("netid", "bob", new_secret) == 400  # not configured yet
        setup.write(providers=("techniek", "netid"), metrics=f"127.0.0.1:{free_port()}")
        needs_restart = reload(daemon, "reload_needs_restart")
        assert needs_restart["sections"] == ["server"]
        reloaded = log_events(daemon.log(), "config_reloaded")[-1]
        assert reloaded["providers_added"] == ["netid"]
        assert setup.import_grant("netid", "bob", new_secret) == 201
        assert request(setup.home.socket, "GET", "/v1/tokens/netid/bob").status == 200


def test_readyz_fails_while_a_required_grant_is_not_usable(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """/readyz names each required grant missing or without a live token; reload updates them."""
    setup = Setup(tmp_path)
    setup.write(required=["techniek/svc", "techniek/short"])
    with running_daemon(setup.home, log_dir) as daemon:
        reply = request(setup.home.socket, "GET", "/readyz")
        assert reply.status == 503
        assert reply.json()["problems"] == [
            "grant techniek/svc: not found; log in with: token-broker login techniek svc",
            "grant techniek/short: not found; log in with: token-broker login techniek short",
        ]
        assert setup.import_grant("techniek", "svc", new_secret) == 201
        # Its token dies in a second, and the provider's token endpoint is closed.
        assert setup.import_grant("techniek", "short", new_secret, expires_in=1) == 201
        time.sleep(1.5)
        reply = request(setup.home.socket, "GET", "/readyz")
        assert reply.status == 503
        assert reply.json()["problems"] == [
            "grant techniek/short: no live access token (its refresh has not succeeded)"
        ]
        setup.write(required=["techniek/svc"])
        reload(daemon, "config_reloaded")
        assert request(setup.home.socket, "GET", "/readyz").status == 200


@pytest.mark.slow
async def test_a_reload_during_a_refresh_lets_the_refresh_finish(
    django_idp_factory: DjangoIdPFactory, log_dir: Path
) -> None:
    """A SIGHUP while a refresh waits on the IdP: the refresh completes and its tokens are good."""
    idp = django_idp_factory(redirect_uris=[REGISTERED_REDIRECT], reuse_protection=True)
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("one", refresh=RefreshSettings(lifetime_fraction=0.9))
        broker.start()
        await broker.log_in("alice", "alice-password")
        before = (await broker.grants())["alice"]
        stats = idp.stats()
        idp.faults(token_delay=2.0, count=1)  # hold the next token answer back for 2 s
        refresh = Tasks().spawn(broker.refresh("alice"), "admin refresh")
        await asyncio.sleep(0.7)
        # A changed provider setting: the refresh in flight keeps the client it started with.
        text = broker.home.config.read_text().replace(
            'refresh_grace = "0s"', 'refresh_grace = "1s"'
        )
        broker.home.config.write_text(text)
        os.kill(broker.pid, signal.SIGHUP)
        reply = await refresh
        assert reply.status == 200, reply.body
        after = reply.json()
        assert after["generation"] == before["generation"] + 1
        events = broker.events("config_reloaded")
        assert [e["providers_changed"] for e in events] == [[PROVIDER]]
        token = await broker.token("alice")
        userinfo = UserInfo(idp)
        try:
            assert await userinfo.status(token.json()["access_token"]) == 200
        finally:
            await userinfo.close()
        delta = stats_delta(stats, idp.stats())
        assert delta["refresh_ok"] == 1
        assert delta["spent_refresh_presented"] == 0


def test_reload_events_carry_no_secret_values(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """What a reload logs names keys and counts, never a bearer token or its digest."""
    setup = Setup(tmp_path)
    bearer = new_secret("bearer")
    setup.write(clients=client_table("first", bearer, ["techniek/*"]))
    with running_daemon(setup.home, log_dir) as daemon:
        setup.write(clients=client_table("first", bearer, ["techniek/*"], admin=True))
        event = reload(daemon, "config_reloaded")
        text = json.dumps(event)
        assert bearer not in text
        assert hashlib.sha256(bearer.encode()).hexdigest() not in text


def test_a_provider_needing_a_new_callback_path_is_named_for_a_restart(
    tmp_path: Path, log_dir: Path
) -> None:
    """The callback listener serves the paths it started with: a new one waits for a restart."""
    setup = Setup(tmp_path)
    callback = f"127.0.0.1:{free_port()}"
    setup.write(callback=callback)
    with running_daemon(setup.home, log_dir) as daemon:
        setup.write(providers=("techniek", "netid"), callback=callback)
        needs_restart = reload(daemon, "reload_needs_restart")
        assert needs_restart["sections"] == [
            "providers.*.redirect_uri (the callback listener's paths)"
        ]
        setup.write(callback=callback)  # back to the served paths: nothing to restart for
        reload(daemon, "config_reloaded")
        assert len(log_events(daemon.log(), "reload_needs_restart")) == 1
