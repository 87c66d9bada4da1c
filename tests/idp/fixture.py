"""Start real django-oauth-toolkit IdPs in their own processes, one per call, on 127.0.0.1.

The schema is migrated once per test session into a template SQLite file; each IdP copies it,
generates its RS256 key into its own directory, and is handed an already listening socket, so
start-up is only Django's import and set-up (about half a second). The `django_idp_factory`
fixture stops every IdP it started: SIGTERM to that process, then a bounded wait.

`issuer=` pins the issuer to another origin, such as a `tests.faultproxy.FaultProxy` started
first: every endpoint URL in the discovery documents, and `iss` in every ID token, then names
that origin, and the `DjangoIdP` endpoint properties do too. `url` and the /test/ helpers
always reach the server directly.
"""

from __future__ import annotations

import atexit
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parents[2]
CLIENT_ID = "broker-test"
DEVICE_CLIENT_ID = "broker-device"  # public, allowed only the device grant (RFC 8628)
DEFAULT_USERS = {"alice": "alice-password", "bob": "bob-password"}
MIGRATE_TIMEOUT = 120.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0

_template_lock = threading.Lock()
_template: Path | None = None


def _template_db() -> Path:
    """The migrated template database, built on first use and removed when pytest exits."""
    global _template  # noqa: PLW0603 -- one migration per test session is the point
    with _template_lock:
        if _template is None:
            directory = Path(tempfile.mkdtemp(prefix="tb-idp-template-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            db = directory / "template.sqlite3"
            done = subprocess.run(
                [sys.executable, "-m", "tests.idp.serve", "--migrate-only", "--db", str(db)],
                cwd=REPO,
                check=False,
                timeout=MIGRATE_TIMEOUT,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"migrating the test IdP's template failed:\n{done.stderr}")
            _template = db
        return _template


def _write_key(path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.touch(mode=0o600)
    path.write_bytes(pem)


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


class DjangoIdP:
    """A running django-oauth-toolkit server; see the module docstring."""

    def __init__(self, directory: Path, argv: list[str], issuer: str | None = None) -> None:
        self.directory = directory
        self.log_path = directory / "server.log"
        self.client_id = CLIENT_ID
        self.port = 0
        self.subs: dict[str, str] = {}  # username -> `sub` claim
        self._argv = argv
        self._issuer = issuer
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's own origin, never through a proxy."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        """The issuer: the pinned one (a proxy's origin + /o) or this server's origin + /o."""
        return self._issuer or f"{self.url}/o"

    @property
    def origin(self) -> str:
        """The issuer's origin: where clients send every request (a proxy, when pinned)."""
        return self.issuer.removesuffix("/o")

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def authorize_endpoint(self) -> str:
        return f"{self.issuer}/authorize/"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token/"

    @property
    def revocation_endpoint(self) -> str:
        return f"{self.issuer}/revoke_token/"

    @property
    def userinfo_endpoint(self) -> str:
        return f"{self.issuer}/userinfo/"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.issuer}/introspect/"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    @property
    def metadata_urls(self) -> tuple[str, str]:
        """The RFC 8414 document at RFC 8414's location and at DOT's (issuer + well-known)."""
        return (
            f"{self.origin}/.well-known/oauth-authorization-server/o",
            f"{self.issuer}/.well-known/oauth-authorization-server",
        )

    @property
    def device_client_id(self) -> str:
        """The public client allowed the device grant (the other one is the code flow's)."""
        return DEVICE_CLIENT_ID

    @property
    def device_authorization_endpoint(self) -> str:
        return f"{self.issuer}/device-authorization/"

    @property
    def device_page(self) -> str:
        """DOT's page where a person enters a user code (the verification URI)."""
        return f"{self.issuer}/device/"

    def _start(self) -> None:
        started = time.monotonic()
        sock = _listen(self.port)
        self.port = sock.getsockname()[1]
        argv = [*self._argv, "--port", str(self.port), "--fd", str(sock.fileno())]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.idp.serve", *argv],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(sock.fileno(),),
            )
        sock.close()  # the child holds the listening socket now
        while True:
            try:
                status, subs = self._request("GET", "/test/users", timeout=2.0)
                if status != 200:
                    self.stop()
                    raise RuntimeError(self._failure(f"answered {status}"))
                self.subs = dict(subs)
                return
            except OSError:
                if self._proc.poll() is not None:
                    raise RuntimeError(self._failure("exited")) from None
                if time.monotonic() - started > START_TIMEOUT:
                    self.stop()
                    raise RuntimeError(self._failure("did not answer")) from None
                time.sleep(0.05)

    def _failure(self, what: str) -> str:
        return f"test IdP {what}; its log:\n{self.log_path.read_text(errors='replace')[-4000:]}"

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body)
            all_headers = {"Content-Type": "application/json"} | (headers or {})
            conn.request(method, path, body=payload, headers=all_headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode(errors="replace")

    def stats(self) -> dict[str, Any]:
        """The IdP's counters since its process started (the package docstring lists them)."""
        status, data = self._request("GET", "/test/stats")
        assert status == 200, data
        return dict(data)

    def faults(self, **spec: Any) -> None:
        """Arm token-endpoint faults: token_status=503, count=N or token_delay=2.0, count=N."""
        status, data = self._request("POST", "/test/faults", spec)
        assert status == 200, data

    def settings(self, **changes: Any) -> dict[str, Any]:
        """Change access_token_lifetime, refresh_grace, reuse_protection, introspection,
        device_interval or device_expires_in (of device codes issued from then on) while
        running."""
        status, data = self._request("POST", "/test/settings", changes)
        assert status == 200, data
        return dict(data)

    def userinfo(self, access_token: str) -> tuple[int, dict[str, Any]]:
        """GET /o/userinfo/ with the token: the status and the JSON body (claims or error)."""
        auth = {"Authorization": f"Bearer {access_token}"}
        status, data = self._request("GET", "/o/userinfo/", headers=auth)
        return status, data if isinstance(data, dict) else {"body": data}

    def stop(self) -> None:
        """SIGTERM the server process and wait for it (kill it after STOP_TIMEOUT)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop and start again on the same port with the same database and key."""
        self.stop()
        self._start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


def start_django_idp(
    tmp_path: Path,
    *,
    redirect_uris: list[str],
    access_token_lifetime: int = 36000,
    refresh_grace: int = 0,
    reuse_protection: bool = True,
    users: dict[str, str] | None = None,
    issuer: str | None = None,
) -> DjangoIdP:
    """Start an IdP in a new directory under tmp_path; the caller must stop() it.

    DOT matches redirect URIs exactly, except that for http://127.0.0.1 it ignores the port
    (RFC 8252 loopback), so "http://127.0.0.1/callback" admits the broker's ephemeral port.
    `issuer`, when given, must be an http://127.0.0.1:PORT/o URL (see the module docstring).
    """
    if issuer is not None and not issuer.startswith("http://127.0.0.1:"):
        raise ValueError(f"the issuer must be a loopback origin, not {issuer!r}")
    if issuer is not None and urlsplit(issuer).path != "/o":
        raise ValueError(f"the issuer's path must be /o, where DOT is mounted, not {issuer!r}")
    directory = Path(tempfile.mkdtemp(prefix="idp-", dir=tmp_path))
    db, key = directory / "idp.sqlite3", directory / "oidc-key.pem"
    shutil.copyfile(_template_db(), db)
    _write_key(key)
    argv = ["--db", str(db), "--key", str(key)]
    argv += [f"--redirect-uri={uri}" for uri in redirect_uris]
    argv += [f"--user={name}:{password}" for name, password in (users or DEFAULT_USERS).items()]
    argv += ["--access-token-lifetime", str(access_token_lifetime)]
    argv += ["--refresh-grace", str(refresh_grace)]
    if not reuse_protection:
        argv.append("--no-reuse-protection")
    if issuer is not None:
        argv += ["--issuer", issuer]
    idp = DjangoIdP(directory, argv, issuer)
    idp._start()
    return idp


class DjangoIdPFactory(Protocol):
    """What `django_idp_factory` yields: `start_django_idp` without the tmp_path."""

    def __call__(
        self,
        *,
        redirect_uris: list[str],
        access_token_lifetime: int = 36000,
        refresh_grace: int = 0,
        reuse_protection: bool = True,
        users: dict[str, str] | None = None,
        issuer: str | None = None,
    ) -> DjangoIdP: ...


@pytest.fixture
def django_idp_factory(tmp_path: Path) -> Iterator[DjangoIdPFactory]:
    """Start IdPs on demand; every one started is stopped when the test ends."""
    started: list[DjangoIdP] = []

    def start(
        *,
        redirect_uris: list[str],
        access_token_lifetime: int = 36000,
        refresh_grace: int = 0,
        reuse_protection: bool = True,
        users: dict[str, str] | None = None,
        issuer: str | None = None,
    ) -> DjangoIdP:
        idp = start_django_idp(
            tmp_path,
            redirect_uris=redirect_uris,
            access_token_lifetime=access_token_lifetime,
            refresh_grace=refresh_grace,
            reuse_protection=reuse_protection,
            users=users,
            issuer=issuer,
        )
        started.append(idp)
        return idp

    yield start
    for idp in reversed(started):
        idp.stop()
