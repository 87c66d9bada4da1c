"""Real peers: processes with other uids and groups, bearer clients over TCP, and slow clients.

The identity tests need root: a session fixture creates `tbtest-` users and groups (useradd,
groupadd; reused when a crashed run left them) and removes them when the session ends. Clients
run as those users (subprocess `user=`, `group=`, `extra_groups=`) and speak HTTP over the Unix
socket of a real daemon, which reads their identity from the kernel. The socket lives in a
set-group-ID directory of the group `tbtest-sock`, so it is created in that group and every
client, whatever else it is, can connect and be judged by the policy.

The slow-client tests serve in-process with one-second limits and use raw sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import hashlib
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from broker.api.identity import SO_PEERGROUPS, Peer, database_groups, read_peer
from broker.api.server import Limits, start_runner
from broker.config import ClientConfig
from broker.crypto import Keyring, write_keyring
from tests.daemon import DaemonProcess, Home, free_port, request, running_daemon
from tests.test_api import served_api

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: creates tbtest- users and groups and runs clients as them"
)
CLIENT_TIMEOUT = 30.0  # seconds for one client process to make its requests and exit
QUICK = Limits(idle_timeout=1.0, body_timeout=1.0)  # the slow-client tests' limits
SLACK = 1.5  # seconds a loaded two-core machine may add to a timer before a cut is late
PROVIDERS = ("techniek", "netid")
ADMIN_IMPORT = {"provider": "techniek", "user": "carol"}
ADMIN_ROUTES: tuple[Call, ...] = (
    ("GET", "/v1/grants", None),
    ("GET", "/v1/grants/techniek/alice", None),
    ("POST", "/v1/grants/techniek/alice/refresh", None),
    ("DELETE", "/v1/grants/techniek/alice", None),
    ("POST", "/v1/grants", None),  # the body, with a fresh refresh token, is made per test
    ("POST", "/v1/logins", {"provider": "techniek", "user": "carol"}),
    ("GET", "/v1/logins/some-login", None),
)

# The client every test user runs: one request per JSON line on stdin ([method, path, body]),
# one JSON line per answer on stdout, all on one keep-alive connection (never reconnecting).
CLIENT = r"""
import http.client, json, socket, sys

class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(sys.argv[1])

conn = UnixConnection("broker")
for line in sys.stdin:
    method, path, body = json.loads(line)
    headers = {}
    if body is not None:
        body = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    conn.auto_open = 0  # a second connection would be a bug in the server, not a retry
    response = conn.getresponse()
    answer = {"status": response.status, "body": response.read().decode()}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""


# -- accounts -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    """A test user: its name, uid and primary gid."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Accounts:
    """The users and groups the identity tests run clients as."""

    billing: Account  # a client entry by unix_user, techniek/*
    member: Account  # in group tbtest-svc (a client entry by unix_group, netid/*)
    stranger: Account  # in no client entry
    admin: Account  # a client entry with admin = true
    svc_gid: int  # tbtest-svc
    sock_gid: int  # tbtest-sock: may connect to the socket; named by no client
    python: str  # an interpreter these users may run


_GROUPS = ("tbtest-svc", "tbtest-sock")
_USERS = {
    "tbtest-billing": (),
    "tbtest-member": ("tbtest-svc",),
    "tbtest-stranger": (),
    "tbtest-admin": (),
}


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")


def _ensure_group(name: str) -> int:
    with contextlib.suppress(KeyError):
        return grp.getgrnam(name).gr_gid
    _run("groupadd", "--system", name)
    return grp.getgrnam(name).gr_gid


def _ensure_user(name: str, groups: Sequence[str]) -> Account:
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run(
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        )
    if groups:
        _run("usermod", "--append", "--groups", ",".join(groups), name)
    entry = pwd.getpwnam(name)
    return Account(name, entry.pw_uid, entry.pw_gid)


def _remove_accounts() -> None:
    for name in _USERS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            _run("userdel", name)
    for name in (*_GROUPS, *_USERS):  # a user's own group outlives it when others joined it
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            _run("groupdel", name)


def _python_for(account: Account, sock_gid: int) -> str | None:
    """The first interpreter `account` may run: the suite's may sit under a private home."""
    for candidate in dict.fromkeys([sys.executable, "/usr/bin/python3", shutil.which("python3")]):
        if candidate is None:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run(
                [candidate, "-c", "import http.client, json, socket"],
                capture_output=True,
                check=False,
                timeout=CLIENT_TIMEOUT,
                user=account.uid,
                group=account.gid,
                extra_groups=[sock_gid],
                env=_CLIENT_ENV,
                cwd="/",
            )
            if probe.returncode == 0:
                return candidate
    return None


_CLIENT_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    """The tbtest- users and groups, created for the session and removed at its end."""
    if not IS_ROOT:
        pytest.skip("needs root: creates tbtest- users and groups and runs clients as them")
    try:
        svc, sock = (_ensure_group(name) for name in _GROUPS)
        users = [_ensure_user(name, groups) for name, groups in _USERS.items()]
        python = _python_for(users[2], sock)
        if python is None:
            pytest.skip("no Python interpreter that an unprivileged user may run")
        billing, member, stranger, admin = users
        yield Accounts(billing, member, stranger, admin, svc, sock, python)
    finally:
        _remove_accounts()


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer a client process got."""

    status: int
    body: str

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)

    def code(self) -> str | None:
        """The problem code of an error answer; None for a success (whose body may be a token)."""
        if self.status < 400:
            return None
        code: str | None = self.json().get("code")
        return code


Call = tuple[str, str, object | None]


def run_as(
    accounts: Accounts,
    account: Account,
    sock: Path,
    calls: Sequence[Call],
    *,
    groups: Sequence[int] = (),
) -> list[Answer]:
    """Make `calls` on one connection from a process of `account` with exactly these groups."""
    lines = "".join(json.dumps(call) + "\n" for call in calls)
    done = subprocess.run(
        [accounts.python, "-c", CLIENT, str(sock)],
        input=lines,
        capture_output=True,
        text=True,
        check=False,
        timeout=CLIENT_TIMEOUT,
        user=account.uid,
        group=account.gid,
        extra_groups=[accounts.sock_gid, *groups],
        env=_CLIENT_ENV,
        cwd="/",
    )
    if done.returncode != 0:
        # stderr holds a traceback of the client; it never prints a body.
        raise AssertionError(f"client as {account.name} exited {done.returncode}: {done.stderr}")
    return [Answer(**json.loads(line)) for line in done.stdout.splitlines()]


# -- a daemon for other users ---------------------------------------------------------------------


@pytest.fixture
def shared_dir(accounts: Accounts) -> Iterator[Path]:
    """A directory the test users may enter, whose new files belong to group tbtest-sock."""
    path = Path(tempfile.mkdtemp(prefix="tbtest-"))
    try:
        os.chown(path, 0, accounts.sock_gid)
        path.chmod(0o2750)
        parent = path.parent
        if parent.stat().st_mode & 0o001 == 0:
            pytest.skip(f"{parent} is not traversable by other users")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _toml(value: object) -> str:
    return json.dumps(value)  # strings, booleans, integers and string lists read the same


def write_config(
    home: Home,
    state: Path,
    clients: Sequence[Mapping[str, object]],
    *,
    tcp: str | None = None,
) -> None:
    """A config for `home`: plain OAuth providers at a loopback port nobody listens on."""
    idp = f"http://127.0.0.1:{free_port()}"
    providers = "".join(
        f"""
[providers.{name}]
authorization_endpoint = "{idp}/{name}/authorize"
token_endpoint = "{idp}/{name}/token"
client_id = "broker-test"
scopes = ["profile"]
redirect_uri = "http://localhost:8000/oauth-callback/{name}/"
"""
        for name in PROVIDERS
    )
    entries = "".join(
        "\n[[clients]]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in client.items())
        for client in clients
    )
    listener = "" if tcp is None else f"tcp = {_toml(tcp)}\n"
    home.config.write_text(
        f"""
[server]
socket = {_toml(str(home.socket))}
socket_mode = "0660"
callback = ""
metrics = ""
{listener}
[store]
url = {_toml(f"sqlite:///{state / 'broker.db'}")}
key_file = {_toml(str(state / "keys"))}
{providers}{entries}"""
    )
    write_keyring(state / "keys", Keyring.generate(datetime.now(UTC)), replace=True)


def import_grant(home: Home, provider: str, user: str, new_secret: Callable[[str], str]) -> str:
    """Import PROVIDER/USER with a long-lived access token, as root (admin); the access token."""
    access = new_secret("at")
    reply = request(
        home.socket,
        "POST",
        "/v1/grants",
        {
            "provider": provider,
            "user": user,
            "refresh_token": new_secret("rt"),
            "access_token": access,
            "expires_in": 86_400,
        },
    )
    assert reply.status == 201, reply.body
    return access


@dataclass(frozen=True, slots=True)
class PeerBroker:
    """A daemon whose [[clients]] name the test users, with grants imported."""

    home: Home
    daemon: DaemonProcess
    tokens: Mapping[str, str]  # PROVIDER/USER -> access token

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the daemon's /metrics, asked as root."""
        reply = request(self.home.socket, "GET", "/metrics")
        assert reply.status == 200
        for family in text_string_to_metric_families(reply.body.decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None


@pytest.fixture
def broker(
    accounts: Accounts,
    shared_dir: Path,
    tmp_path: Path,
    log_dir: Path,
    new_secret: Callable[[str], str],
) -> Iterator[PeerBroker]:
    """A daemon run by root for the test users; alice's and bob's grants at both providers."""
    home = Home(shared_dir)
    clients: list[dict[str, object]] = [
        {"name": "billing", "unix_user": accounts.billing.name, "grants": ["techniek/*"]},
        {"name": "svc", "unix_group": "tbtest-svc", "grants": ["netid/*"]},
        {"name": "reader", "unix_uid": accounts.member.uid, "grants": ["techniek/bob"]},
        {"name": "ops", "unix_user": accounts.admin.name, "admin": True},
    ]
    write_config(home, tmp_path, clients)
    with running_daemon(home, log_dir) as daemon:
        tokens = {
            f"{p}/{u}": import_grant(home, p, u, new_secret)
            for p in PROVIDERS
            for u in ("alice", "bob")
        }
        yield PeerBroker(home, daemon, tokens)


def _served(answer: Answer, token: str) -> bool:
    """Whether `answer` is a 200 serving exactly `token` (compared here, never printed)."""
    return answer.status == 200 and answer.json().get("access_token") == token


def _token_calls(*grants: str) -> list[Call]:
    return [("GET", f"/v1/tokens/{grant}", None) for grant in grants]


# -- identity and policy over a real daemon -------------------------------------------------------


@needs_root
def test_a_client_gets_its_grants_and_403_for_others(
    accounts: Accounts, broker: PeerBroker
) -> None:
    """A uid allowed techniek/* gets those tokens, and a 403 forbidden for a netid grant."""
    alice, bob, netid = run_as(
        accounts,
        accounts.billing,
        broker.home.socket,
        _token_calls("techniek/alice", "techniek/bob", "netid/alice"),
    )
    assert _served(alice, broker.tokens["techniek/alice"]), alice.status
    assert _served(bob, broker.tokens["techniek/bob"]), bob.status
    assert (netid.status, netid.code()) == (403, "forbidden")
    assert "billing" in netid.json()["detail"]


@needs_root
def test_an_unknown_uid_is_refused_and_counted_as_forbidden(
    accounts: Accounts, broker: PeerBroker
) -> None:
    """A uid in no client entry gets 403 for tokens and admin routes; token refusals are counted."""
    answers = run_as(
        accounts,
        accounts.stranger,
        broker.home.socket,
        [*_token_calls("techniek/alice", "techniek/bob", "netid/alice"), ADMIN_ROUTES[0]],
    )
    assert [(a.status, a.code()) for a in answers] == [(403, "forbidden")] * 4
    (health,) = run_as(accounts, accounts.stranger, broker.home.socket, [("GET", "/healthz", None)])
    assert health.status == 200
    name = "token_broker_token_requests_total"
    assert broker.metric(name, provider="techniek", outcome="forbidden") == 2
    assert broker.metric(name, provider="netid", outcome="forbidden") == 1


@needs_root
def test_a_supplementary_group_named_by_unix_group_admits_its_members(
    accounts: Accounts, broker: PeerBroker
) -> None:
    """Holding tbtest-svc adds netid/* to the member's own techniek/bob; dropping it, not."""
    calls = _token_calls("netid/alice", "techniek/bob", "techniek/alice")
    with_group = run_as(
        accounts, accounts.member, broker.home.socket, calls, groups=[accounts.svc_gid]
    )
    assert _served(with_group[0], broker.tokens["netid/alice"]), with_group[0].status
    assert _served(with_group[1], broker.tokens["techniek/bob"]), with_group[1].status
    assert (with_group[2].status, with_group[2].code()) == (403, "forbidden")
    assert "svc+reader" in with_group[2].json()["detail"]

    # The group database still lists the member in tbtest-svc: only the process's groups count.
    assert accounts.member.name in grp.getgrgid(accounts.svc_gid).gr_mem
    without = run_as(accounts, accounts.member, broker.home.socket, calls)
    assert (without[0].status, without[0].code()) == (403, "forbidden")
    assert _served(without[1], broker.tokens["techniek/bob"]), without[1].status
    assert (without[2].status, without[2].code()) == (403, "forbidden")


@needs_root
def test_sighup_admits_a_uid_added_to_the_clients(accounts: Accounts, broker: PeerBroker) -> None:
    """A uid refused before a reload is served after SIGHUP adds a [[clients]] entry for it."""
    calls = _token_calls("techniek/alice")
    (before,) = run_as(accounts, accounts.stranger, broker.home.socket, calls)
    assert (before.status, before.code()) == (403, "forbidden")
    entry = f'\n[[clients]]\nname = "late"\nunix_uid = {accounts.stranger.uid}\n'
    broker.home.config.write_text(
        broker.home.config.read_text() + entry + 'grants = ["techniek/alice"]\n'
    )
    os.kill(broker.daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while '"event": "config_reloaded"' not in broker.daemon.log():
        assert time.monotonic() < deadline, broker.daemon.log_tail()
        time.sleep(0.02)
    (after,) = run_as(accounts, accounts.stranger, broker.home.socket, calls)
    assert _served(after, broker.tokens["techniek/alice"]), after.status


@needs_root
def test_a_primary_group_named_by_unix_group_admits_a_process(
    accounts: Accounts, broker: PeerBroker
) -> None:
    """A process whose primary gid is tbtest-svc is admitted through it, whatever its uid."""
    as_group = Account(accounts.stranger.name, accounts.stranger.uid, accounts.svc_gid)
    (answer,) = run_as(accounts, as_group, broker.home.socket, _token_calls("netid/bob"))
    assert _served(answer, broker.tokens["netid/bob"]), answer.status


@needs_root
def test_admin_routes_refuse_a_non_admin_and_admit_an_admin_client_and_root(
    accounts: Accounts, broker: PeerBroker, new_secret: Callable[[str], str]
) -> None:
    """Every admin route is 403 to a non-admin client, and open to an admin client and to root."""
    calls = list(ADMIN_ROUTES)
    calls[4] = ("POST", "/v1/grants", {**ADMIN_IMPORT, "refresh_token": new_secret("rt")})
    refused = run_as(accounts, accounts.billing, broker.home.socket, calls)
    assert [(a.status, a.code()) for a in refused] == [(403, "forbidden")] * len(ADMIN_ROUTES)
    assert request(broker.home.socket, "GET", "/v1/grants/techniek/carol").status == 404

    admitted = run_as(accounts, accounts.admin, broker.home.socket, calls)
    statuses = {f"{m} {p}": a.status for (m, p, _), a in zip(calls, admitted, strict=True)}
    assert statuses == {
        "GET /v1/grants": 200,
        "GET /v1/grants/techniek/alice": 200,
        # The identity provider is a port nobody listens on: the refresh is tried; the grant
        # comes back with the error recorded.
        "POST /v1/grants/techniek/alice/refresh": 200,
        "DELETE /v1/grants/techniek/alice": 200,
        "POST /v1/grants": 201,
        "POST /v1/logins": 201,
        "GET /v1/logins/some-login": 404,
    }, [a.body for a in admitted if a.status >= 400]
    assert {g["user"] for g in admitted[0].json()} == {"alice", "bob"}
    assert admitted[2].json()["last_error"]

    as_root = request(broker.home.socket, "GET", "/v1/grants")
    assert as_root.status == 200
    assert {(g["provider"], g["user"]) for g in as_root.json()} == {
        ("techniek", "bob"),
        ("techniek", "carol"),
        ("netid", "alice"),
        ("netid", "bob"),
    }


# -- peer credentials across processes ------------------------------------------------------------


@contextlib.contextmanager
def _listener() -> Iterator[tuple[socket.socket, str]]:
    """A listening Unix socket in the abstract namespace: no file, so any uid may connect."""
    name = f"tbtest-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("\0" + name)
        server.listen(1)
        server.settimeout(CLIENT_TIMEOUT)
        yield server, name


_CONNECT_AND_WAIT = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "s.connect('\\0' + sys.argv[1])\n"
    "sys.stdin.read()\n"
)


def _peer_of(accounts: Accounts, uid: int, gid: int, groups: Sequence[int]) -> tuple[Peer, int]:
    """The Peer read_peer sees for a process with these ids; and that process's pid."""
    with _listener() as (server, name):
        child = subprocess.Popen(
            [accounts.python, "-c", _CONNECT_AND_WAIT, name],
            stdin=subprocess.PIPE,
            user=uid,
            group=gid,
            extra_groups=list(groups),
            env=_CLIENT_ENV,
            cwd="/",
        )
        try:
            conn, _ = server.accept()
            with conn:
                peer = read_peer(conn)
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(CLIENT_TIMEOUT)
    return peer, child.pid


@needs_root
@pytest.mark.parametrize("count", [0, 3, 300])
def test_so_peergroups_gives_a_peers_exact_groups(accounts: Accounts, count: int) -> None:
    """A child's uid, gid and supplementary groups are read whole, past 256 groups too."""
    groups = [60_000 + i for i in range(count)]
    peer, pid = _peer_of(accounts, 54_321, 54_322, groups)
    assert peer == Peer(pid=pid, uid=54_321, gid=54_322, groups=frozenset(groups))


@needs_root
def test_without_so_peergroups_the_group_database_speaks_for_the_peer(
    accounts: Accounts,
) -> None:
    """The fallback gives the user's groups from the database, even ones its process dropped."""

    class WithoutPeerGroups:
        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
            if optname == SO_PEERGROUPS:
                raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
            return self._sock.getsockopt(level, optname, buflen)

        def fileno(self) -> int:
            return self._sock.fileno()

    member = accounts.member
    with _listener() as (server, name):
        child = subprocess.Popen(
            [accounts.python, "-c", _CONNECT_AND_WAIT, name],
            stdin=subprocess.PIPE,
            user=member.uid,
            group=member.gid,
            extra_groups=[],
            env=_CLIENT_ENV,
            cwd="/",
        )
        try:
            conn, _ = server.accept()
            with conn:
                exact = read_peer(conn)
                fallback = read_peer(WithoutPeerGroups(conn))
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(CLIENT_TIMEOUT)
    assert exact.groups == frozenset()
    assert accounts.svc_gid in fallback.groups
    assert fallback.groups == set(database_groups(member.uid, member.gid))


# -- a reload governs open connections ------------------------------------------------------------


@needs_root
async def test_a_policy_replaced_on_reload_governs_an_open_connection(
    accounts: Accounts, shared_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """A connection refused before Policy.replace is served on its next request, and back."""
    async with served_api(shared_dir) as api:
        api.socket.chmod(0o660)
        access = new_secret("at")
        reply = await api.import_grant(
            provider="techniek",
            user="alice",
            refresh_token=new_secret("rt"),
            access_token=access,
            expires_in=3600,
        )
        assert reply.status == 201
        stranger = accounts.stranger
        client = await asyncio.create_subprocess_exec(
            accounts.python,
            "-c",
            CLIENT,
            str(api.socket),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            user=stranger.uid,
            group=stranger.gid,
            extra_groups=[accounts.sock_gid],
            env=_CLIENT_ENV,
            cwd="/",
        )
        assert client.stdin is not None
        assert client.stdout is not None
        call = json.dumps(["GET", "/v1/tokens/techniek/alice", None]).encode() + b"\n"

        async def ask() -> Answer:
            assert client.stdin is not None
            assert client.stdout is not None
            client.stdin.write(call)
            await client.stdin.drain()
            line = await asyncio.wait_for(client.stdout.readline(), CLIENT_TIMEOUT)
            assert line, "the client process ended early"
            return Answer(**json.loads(line))

        try:
            first = await ask()
            assert (first.status, first.code()) == (403, "forbidden")
            allowed = ClientConfig(
                name="late",
                unix_user=stranger.name,
                unix_uid=None,
                unix_group=None,
                token_sha256=None,
                grants=("techniek/*",),
                admin=False,
            )
            api.policy.replace([allowed])
            second = await ask()
            assert _served(second, access), second.status
            api.policy.replace([])
            third = await ask()
            assert (third.status, third.code()) == (403, "forbidden")
        finally:
            client.stdin.close()
            assert await asyncio.wait_for(client.wait(), CLIENT_TIMEOUT) == 0


# -- bearer tokens over the daemon's TCP listener -------------------------------------------------


def _tcp(port: int, path: str, token: str | None = None) -> tuple[int, Mapping[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "GET", path, headers={} if token is None else {"Authorization": f"Bearer {token}"}
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        conn.close()


def test_the_daemons_tcp_listener_wants_a_clients_bearer_token(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """On the daemon's TCP listener: no or a wrong bearer is 401, the right one gets its grants."""
    bearer = new_secret("bearer")
    port = free_port()
    home = Home(tmp_path / "home")
    home.root.mkdir()
    client = {
        "name": "billing",
        "token_sha256": hashlib.sha256(bearer.encode()).hexdigest(),
        "grants": ["techniek/*"],
    }
    write_config(home, tmp_path, [client], tcp=f"127.0.0.1:{port}")
    with running_daemon(home, log_dir):
        access = import_grant(home, "techniek", "alice", new_secret)
        import_grant(home, "netid", "alice", new_secret)

        status, headers, body = _tcp(port, "/v1/tokens/techniek/alice")
        assert (status, body["code"]) == (401, "unauthenticated")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, body = _tcp(port, "/v1/tokens/techniek/alice", new_secret("bearer"))
        assert (status, body["code"]) == (401, "unauthenticated")

        status, headers, body = _tcp(port, "/v1/tokens/techniek/alice", bearer)
        served = status == 200 and body["access_token"] == access
        assert served, f"{status}: not the imported token"
        assert headers["Cache-Control"] == "no-store"
        status, _, body = _tcp(port, "/v1/tokens/netid/alice", bearer)
        assert (status, body["code"]) == (403, "forbidden")
        status, _, body = _tcp(port, "/v1/grants", bearer)
        assert (status, body["code"]) == (403, "forbidden")
        assert _tcp(port, "/healthz")[0] == 200

        metrics = request(home.socket, "GET", "/metrics").body.decode()
    counts = {
        (s.labels["provider"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == "token_broker_token_requests_total" and s.value
    }
    assert counts == {
        ("techniek", "unauthenticated"): 2,
        ("techniek", "served"): 1,
        ("netid", "forbidden"): 1,
    }


# -- slow and oversized clients -------------------------------------------------------------------


async def _closed_within(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    limit: float,
    drip: bytes = b"",
    every: float = 0.1,
) -> tuple[float, bytes]:
    """Send `drip` every `every` seconds until the server closes; (seconds taken, bytes read)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = b""
    while loop.time() - started < limit:
        if drip:
            with contextlib.suppress(ConnectionError):
                writer.write(drip)
                await writer.drain()
        try:
            chunk = await asyncio.wait_for(reader.read(65_536), every)
        except TimeoutError:
            continue
        except ConnectionError:
            chunk = b""
        if not chunk:
            return loop.time() - started, received
        received += chunk
    raise AssertionError(f"the connection was still open after {limit} s")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines if line)
    }
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return int(status_line.split()[1]), headers, body


@contextlib.asynccontextmanager
async def _connection(
    path: Path,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("after_a_request", [False, True])
async def test_a_request_head_trickled_a_byte_at_a_time_is_cut_after_the_idle_timeout(
    tmp_path: Path, after_a_request: bool
) -> None:
    """Slowloris: a head that never ends is cut at idle_timeout, though bytes keep arriving."""
    async with served_api(tmp_path, limits=QUICK) as api, _connection(api.socket) as (r, w):
        if after_a_request:  # the timer restarts with each answer on a keep-alive connection
            w.write(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
            assert (await _read_response(r))[0] == 200
        w.write(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n")
        taken, received = await _closed_within(r, w, QUICK.idle_timeout + SLACK, drip=b"X")
    assert received == b""
    assert QUICK.idle_timeout - 0.05 <= taken <= QUICK.idle_timeout + SLACK


async def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(
    tmp_path: Path,
) -> None:
    """A client that connects and stays silent is disconnected at idle_timeout."""
    async with served_api(tmp_path, limits=QUICK) as api, _connection(api.socket) as (r, w):
        taken, received = await _closed_within(r, w, QUICK.idle_timeout + SLACK)
    assert received == b""
    assert QUICK.idle_timeout - 0.05 <= taken <= QUICK.idle_timeout + SLACK


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    tmp_path: Path,
) -> None:
    """After an answer, a keep-alive connection may idle for idle_timeout, then it is closed."""
    async with served_api(tmp_path, limits=QUICK) as api, _connection(api.socket) as (r, w):
        w.write(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        status, headers, _ = await _read_response(r)
        assert status == 200
        assert headers.get("connection", "keep-alive").lower() != "close"
        taken, received = await _closed_within(r, w, QUICK.idle_timeout + SLACK)
    assert received == b""
    assert QUICK.idle_timeout - 0.05 <= taken <= QUICK.idle_timeout + SLACK


async def test_a_body_slower_than_its_content_length_is_cut_with_a_408(tmp_path: Path) -> None:
    """A trickling body is answered 408 problem+json, and the connection closed, at body_timeout."""
    async with served_api(tmp_path, limits=QUICK) as api, _connection(api.socket) as (r, w):
        w.write(
            b"POST /v1/grants HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400\r\n\r\n{"
        )
        taken, received = await _closed_within(r, w, QUICK.body_timeout + SLACK, drip=b" ")
        assert (await api.call("GET", "/v1/grants")).json() == []
    assert QUICK.body_timeout - 0.05 <= taken <= QUICK.body_timeout + SLACK
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(body)["code"] == "request_timeout"


async def test_a_prompt_client_keeps_its_connection_across_requests(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """Requests with bodies, sent promptly, are served one after another on one connection."""
    async with served_api(tmp_path, limits=QUICK) as api, _connection(api.socket) as (r, w):
        for user in ("alice", "bob"):
            grant = {"provider": "techniek", "user": user, "refresh_token": new_secret("rt")}
            body = json.dumps(grant)
            w.write(
                b"POST /v1/grants HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
            )
            status, _, _ = await _read_response(r)
            assert status == 201
            await asyncio.sleep(QUICK.idle_timeout / 2)
        w.write(b"GET /v1/grants HTTP/1.1\r\nHost: broker\r\n\r\n")
        status, _, listed = await _read_response(r)
    assert status == 200
    assert [g["user"] for g in json.loads(listed)] == ["alice", "bob"]


@contextlib.asynccontextmanager
async def _slow_app(tmp_path: Path, handler_seconds: float) -> AsyncIterator[Path]:
    """An app behind start_runner (QUICK limits) whose handlers take `handler_seconds`."""

    async def slow(request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(handler_seconds)
        return web.json_response({"read": len(body)})

    app = web.Application()
    app.router.add_route("*", "/slow", slow)
    path = tmp_path / "slow.sock"
    async with contextlib.AsyncExitStack() as stack:
        runner = await start_runner(stack, app, QUICK)
        await web.UnixSite(runner, str(path)).start()
        yield path


async def test_a_slow_handler_is_not_limited_by_the_client_timeouts(tmp_path: Path) -> None:
    """A handler that takes longer than both timeouts answers, and its connection lives on."""
    handler_seconds = max(QUICK.idle_timeout, QUICK.body_timeout) + 0.5
    async with (
        _slow_app(tmp_path, handler_seconds) as path,
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path), limit=1)) as session,
    ):
        started = time.monotonic()
        async with session.get("http://broker/slow") as response:
            assert response.status == 200
            assert await response.json() == {"read": 0}
        async with session.post("http://broker/slow", data=b"x" * 1000) as response:
            assert response.status == 200
            assert await response.json() == {"read": 1000}
        taken = time.monotonic() - started
    assert taken >= 2 * handler_seconds


@pytest.mark.parametrize(
    ("what", "head"),
    [
        ("request line", b"GET /healthz?" + b"x" * 8200 + b" HTTP/1.1\r\nHost: b\r\n\r\n"),
        ("header line", b"GET /healthz HTTP/1.1\r\nHost: b\r\nX-Big: " + b"x" * 8200 + b"\r\n\r\n"),
        (
            "header count",
            b"GET /healthz HTTP/1.1\r\nHost: b\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(64))
            + b"\r\n",
        ),
    ],
)
async def test_an_oversized_request_head_is_refused_and_the_connection_closed(
    tmp_path: Path, what: str, head: bytes
) -> None:
    """A request line, header line or header count past the limits gets a 400 and a close."""
    async with served_api(tmp_path) as api, _connection(api.socket) as (r, w):
        w.write(head)
        _, received = await _closed_within(r, w, 10.0)
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.split()[1:2] == [b"400"], what
    head_fields, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head_fields.lower(), what
    assert json.loads(body)["code"] == "bad_request"
    assert head[20:60] not in received  # the refused bytes are not echoed back


async def test_a_request_head_just_within_the_limits_is_served(tmp_path: Path) -> None:
    """A head at the limits (63 extra headers, long lines) is served normally."""
    limits = Limits()
    padding = b"x" * (limits.max_field_size - 100)
    head = (
        b"GET /healthz HTTP/1.1\r\nHost: b\r\nX-Big: "
        + padding
        + b"\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(limits.max_headers - 2))
        + b"\r\n"
    )
    async with served_api(tmp_path) as api, _connection(api.socket) as (r, w):
        w.write(head)
        status, _, _ = await _read_response(r)
    assert status == 200
