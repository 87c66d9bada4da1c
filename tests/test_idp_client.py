"""ProviderClient against a fake IdP on 127.0.0.1: discovery, authorize URLs, token calls, keys.

The fake answers whatever a test installs at a path and records every request it receives (the
form it was posted, the headers), so each test can say exactly what the broker sent and how many
calls it made.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import RSAKey
from multidict import CIMultiDict

import broker.idp.client as client_module
from broker.config import ProviderConfig, parse_config
from broker.errors import (
    IdpAmbiguous,
    IdpError,
    IdpNotProcessed,
    IdpUnreachable,
    IdTokenInvalid,
    StartupError,
)
from broker.idp.client import (
    DISCOVERY_RETRY_SECONDS,
    JWKS_REFETCH_INTERVAL,
    METADATA_TTL_SECONDS,
    Pkce,
    ProviderClient,
    read_client_secret,
)
from broker.model import Secret

NewSecret = Callable[[str], str]
CLIENT_ID = "broker-test"
REDIRECT_URI = "http://127.0.0.1:8000/oauth-callback/"
JWKS_PATH = "/o/.well-known/jwks.json"
KEY_A = RSAKey.generate_key(2048, parameters={"kid": "key-a"})
KEY_B = RSAKey.generate_key(2048, parameters={"kid": "key-b"})
KEY_C = RSAKey.generate_key(2048, parameters={"kid": "key-c"})


def _jwks(*keys: RSAKey) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False) for key in keys]}


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the fake IdP received."""

    method: str
    path: str
    form: dict[str, str]
    headers: Mapping[str, str]  # case-insensitive, as HTTP header names are


class FakeIdP:
    """A loopback IdP: each path answers what the test installed (404 otherwise)."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.seen: list[Seen] = []
        self.base = ""

    def url(self, path: str) -> str:
        """An absolute URL on the fake."""
        return self.base + path

    def answer(
        self,
        path: str,
        body: object,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Serve `body` (JSON unless bytes) at `path` from now on."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[path] = (status, raw, {"Content-Type": "application/json", **(headers or {})})

    def hits(self, path: str) -> int:
        """How many requests reached `path`."""
        return sum(1 for seen in self.seen if seen.path == path)

    def last(self, path: str) -> Seen:
        """The latest request to `path`."""
        return [seen for seen in self.seen if seen.path == path][-1]

    def serve_oidc(self, **changes: object) -> dict[str, Any]:
        """Serve an issuer at /o: discovery (a change of None drops a key), token, revoke, JWKS."""
        document: dict[str, Any] = {
            "issuer": self.url("/o"),
            "authorization_endpoint": self.url("/o/authorize/"),
            "token_endpoint": self.url("/o/token/"),
            "revocation_endpoint": self.url("/o/revoke/"),
            "jwks_uri": self.url(JWKS_PATH),
            "id_token_signing_alg_values_supported": ["RS256"],
            **changes,
        }
        document = {key: value for key, value in document.items() if value is not None}
        self.answer("/o/.well-known/openid-configuration", document)
        self.answer("/o/token/", {"access_token": "at-1", "expires_in": 3600})
        self.answer("/o/revoke/", b"")
        self.answer(JWKS_PATH, _jwks(KEY_A))
        return document

    async def _handle(self, request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.seen.append(Seen(request.method, request.path, form, CIMultiDict(request.headers)))
        if request.path not in self.answers:
            return web.Response(status=404, text="not found")
        status, body, headers = self.answers[request.path]
        return web.Response(status=status, body=body, headers=headers)


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdP]:
    """A running fake IdP."""
    fake = FakeIdP()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake._handle)
    async with TestServer(app, host="127.0.0.1") as server:
        fake.base = f"http://127.0.0.1:{server.port}"
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A session like broker.idp.http.new_session, with short timeouts."""
    timeout = aiohttp.ClientTimeout(total=5, connect=2, sock_connect=2, sock_read=3)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        yield s


def provider(tmp_path: Path, **table: object) -> ProviderConfig:
    """A provider config parsed the way the daemon parses it; keys of None are left out."""
    values: dict[str, object] = {
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scopes": ["openid", "profile"],
        **table,
    }
    values = {key: value for key, value in values.items() if value is not None}
    config = parse_config({"providers": {"techniek": values}}, source="test", base_dir=tmp_path)
    return config.providers["techniek"]


def oidc_client(
    idp: FakeIdP,
    session: aiohttp.ClientSession,
    tmp_path: Path,
    *,
    secret: Secret | None = None,
    **table: object,
) -> ProviderClient:
    """A client for the fake's issuer at /o, with discovery served."""
    return ProviderClient(provider(tmp_path, issuer=idp.url("/o"), **table), session, secret)


# --- token calls ---------------------------------------------------------------------------------


async def test_refresh_sends_grant_type_and_token_but_never_scope(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, new_secret: NewSecret
) -> None:
    """A refresh posts grant_type=refresh_token and the token, never scope (some IdPs refuse it)."""
    idp.serve_oidc()
    refresh, rotated = new_secret("rt"), new_secret("rt")
    idp.answer("/o/token/", {"access_token": "at-2", "refresh_token": rotated, "expires_in": 60})
    client = oidc_client(idp, session, tmp_path)
    await client.prepare()
    tokens = await client.refresh(Secret(refresh))
    sent = idp.last("/o/token/")
    assert sent.method == "POST"
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sent.form == {
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "client_id": CLIENT_ID,
    }
    assert "scope" not in sent.form
    assert tokens.refresh_token == Secret(rotated)
    assert tokens.expires_in == 60


async def test_code_exchange_sends_code_verifier_redirect_uri_and_grant_type(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A code exchange posts the code, the PKCE verifier and the registered redirect_uri."""
    idp.serve_oidc()
    pkce = Pkce.new()
    await oidc_client(idp, session, tmp_path).exchange_code("code-123", pkce.verifier)
    assert idp.last("/o/token/").form == {
        "grant_type": "authorization_code",
        "code": "code-123",
        "code_verifier": pkce.verifier,
        "redirect_uri": REDIRECT_URI,
        "client_id": CLIENT_ID,
    }


async def test_token_call_errors_keep_their_classification(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, new_secret: NewSecret
) -> None:
    """A 502 from the token endpoint reaches the caller as IdpAmbiguous, without the token."""
    idp.serve_oidc()
    idp.answer("/o/token/", b"<html>Bad Gateway</html>", status=502)
    refresh = new_secret("rt")
    client = oidc_client(idp, session, tmp_path)
    await client.prepare()
    with pytest.raises(IdpAmbiguous) as info:
        await client.refresh(Secret(refresh))
    assert refresh not in str(info.value)


def _write_secret(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "techniek.secret"
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("auth", ["none", "client_secret_basic", "client_secret_post"])
async def test_client_authentication_methods(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, new_secret: NewSecret, auth: str
) -> None:
    """none puts client_id in the form; basic sends only the header; post puts both in the form."""
    idp.serve_oidc()
    client_secret = new_secret("cs")
    table: dict[str, object] = {"client_auth": auth}
    secret = None
    if auth != "none":
        table["client_secret_file"] = str(_write_secret(tmp_path, client_secret))
        secret = read_client_secret(tmp_path / "techniek.secret")
        assert secret == Secret(client_secret)  # the trailing newline is stripped
    client = oidc_client(idp, session, tmp_path, secret=secret, **table)
    refresh = new_secret("rt")
    await client.prepare()
    await client.refresh(Secret(refresh))
    sent = idp.last("/o/token/")
    assert sent.form["refresh_token"] == refresh
    if auth == "none":
        assert sent.form["client_id"] == CLIENT_ID
        assert "client_secret" not in sent.form
        assert "Authorization" not in sent.headers
    elif auth == "client_secret_basic":
        expected = base64.b64encode(f"{CLIENT_ID}:{client_secret}".encode()).decode()
        assert sent.headers["Authorization"] == f"Basic {expected}"
        assert "client_secret" not in sent.form
        assert client_secret not in json.dumps(sent.form)
    else:
        assert sent.form["client_id"] == CLIENT_ID
        assert sent.form["client_secret"] == client_secret
        assert "Authorization" not in sent.headers


def test_read_client_secret_refuses_a_missing_or_empty_file(tmp_path: Path) -> None:
    """A missing or blank secret file is a StartupError naming the file, not a blank secret."""
    with pytest.raises(StartupError, match="cannot read"):
        read_client_secret(tmp_path / "absent.secret")
    blank = tmp_path / "blank.secret"
    blank.write_text(" \n")
    with pytest.raises(StartupError, match="empty"):
        read_client_secret(blank)


# --- discovery -----------------------------------------------------------------------------------


async def test_issuer_with_a_path_reads_discovery_under_that_path(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Issuer http://host/o is discovered at /o/.well-known/openid-configuration, and only
    there when that document names every endpoint."""
    document = idp.serve_oidc(
        introspection_endpoint=idp.url("/o/introspect/"),
        device_authorization_endpoint=idp.url("/o/device-authorization/"),
    )
    metadata = await oidc_client(idp, session, tmp_path).metadata()
    assert idp.hits("/o/.well-known/openid-configuration") == 1
    assert metadata.issuer == idp.url("/o")
    assert metadata.authorization_endpoint == document["authorization_endpoint"]
    assert metadata.token_endpoint == document["token_endpoint"]
    assert metadata.jwks_uri == document["jwks_uri"]
    assert metadata.revocation_endpoint == idp.url("/o/revoke/")
    assert [seen.path for seen in idp.seen] == ["/o/.well-known/openid-configuration"]


@pytest.mark.parametrize(
    "oauth_path",
    ["/.well-known/oauth-authorization-server/o", "/o/.well-known/oauth-authorization-server"],
    ids=["rfc8414", "path-suffix"],
)
async def test_revocation_endpoint_is_merged_from_oauth_metadata(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, oauth_path: str
) -> None:
    """A revocation_endpoint missing from OIDC discovery is taken from the RFC 8414 document."""
    idp.serve_oidc(revocation_endpoint=None)
    idp.answer(
        oauth_path,
        {
            "issuer": idp.url("/o"),
            "authorization_endpoint": idp.url("/elsewhere/authorize"),
            "token_endpoint": idp.url("/elsewhere/token"),
            "revocation_endpoint": idp.url("/o/revoke/"),
        },
    )
    metadata = await oidc_client(idp, session, tmp_path).metadata()
    assert metadata.revocation_endpoint == idp.url("/o/revoke/")
    # The OpenID document wins where both name an endpoint.
    assert metadata.token_endpoint == idp.url("/o/token/")
    assert idp.hits("/.well-known/oauth-authorization-server/o") == 1  # RFC 8414's form first


async def test_oauth_metadata_naming_another_issuer_is_refused(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The RFC 8414 document must name the configured issuer too (RFC 8414 section 3.3)."""
    idp.serve_oidc(revocation_endpoint=None)
    idp.answer(
        "/.well-known/oauth-authorization-server/o",
        {"issuer": "https://evil.example/o", "revocation_endpoint": "https://evil.example/r"},
    )
    with pytest.raises(IdpError, match=r"evil\.example"):
        await oidc_client(idp, session, tmp_path).metadata()


async def test_discovery_document_naming_another_issuer_is_refused(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A discovery document for another issuer is a mix-up and is refused (OIDC Discovery 4.3)."""
    idp.serve_oidc(issuer=idp.url("/other"))
    with pytest.raises(IdpError, match="names issuer") as info:
        await oidc_client(idp, session, tmp_path).metadata()
    assert idp.url("/other") in str(info.value)
    assert type(info.value) is IdpError


async def test_issuer_trailing_slash_difference_uses_the_document_issuer(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A config issuer ending in "/" still matches ID tokens whose iss is the document's issuer."""
    idp.serve_oidc()
    client = ProviderClient(provider(tmp_path, issuer=idp.url("/o/")), session)
    metadata = await client.metadata()
    assert idp.hits("/o/.well-known/openid-configuration") == 1
    assert metadata.issuer == idp.url("/o")


async def test_explicit_config_endpoints_override_discovery(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Endpoints set in the config win over what discovery says."""
    idp.serve_oidc()
    idp.answer("/custom/token", {"access_token": "at-custom"})
    idp.answer("/custom/jwks", _jwks(KEY_A))
    client = oidc_client(
        idp,
        session,
        tmp_path,
        token_endpoint=idp.url("/custom/token"),
        revocation_endpoint=idp.url("/custom/revoke"),
        jwks_uri=idp.url("/custom/jwks"),
    )
    metadata = await client.metadata()
    assert metadata.token_endpoint == idp.url("/custom/token")
    assert metadata.revocation_endpoint == idp.url("/custom/revoke")
    assert metadata.jwks_uri == idp.url("/custom/jwks")
    assert metadata.authorization_endpoint == idp.url("/o/authorize/")
    await client.prepare()  # an OpenID provider: its keys come from the configured jwks_uri
    await client.refresh(Secret("rt-x"))
    assert idp.hits("/custom/token") == 1
    assert idp.hits("/o/token/") == 0
    assert idp.hits("/custom/jwks") == 1
    assert idp.hits(JWKS_PATH) == 0


async def test_plain_oauth_provider_uses_explicit_endpoints_without_any_http(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With no issuer there is no discovery: the configured endpoints are used as they are."""
    config = provider(
        tmp_path,
        scopes=["permission_management"],
        authorization_endpoint=idp.url("/authorize"),
        token_endpoint=idp.url("/token"),
    )
    client = ProviderClient(config, session)
    metadata = await client.metadata()
    assert idp.seen == []
    assert metadata.issuer is None
    assert metadata.token_endpoint == idp.url("/token")
    assert metadata.revocation_endpoint is None
    assert metadata.jwks_uri is None
    assert not client.wants_id_token


async def test_id_token_algorithms_keep_only_asymmetric_ones(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """ "none" and HMAC algorithms advertised by discovery are dropped."""
    idp.serve_oidc(id_token_signing_alg_values_supported=["none", "HS256", "RS256", "ES256"])
    metadata = await oidc_client(idp, session, tmp_path).metadata()
    assert metadata.id_token_algorithms == ("RS256", "ES256")


async def test_only_symmetric_algorithms_fall_back_to_rs256(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A provider advertising only HS256 and none gets RS256, the OIDC default, not those."""
    idp.serve_oidc(id_token_signing_alg_values_supported=["HS256", "none"])
    metadata = await oidc_client(idp, session, tmp_path).metadata()
    assert metadata.id_token_algorithms == ("RS256",)


class FakeMonotonic:
    """Stands in for the `time` module inside broker.idp.client: a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        """The fake monotonic time."""
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    """Drive the client's metadata TTL and JWKS refetch interval by hand."""
    fake = FakeMonotonic()
    monkeypatch.setattr(client_module, "time", fake)
    return fake


async def test_metadata_is_cached_until_its_ttl(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, clock: FakeMonotonic
) -> None:
    """A second metadata call makes no request; one after METADATA_TTL_SECONDS discovers again."""
    idp.serve_oidc()
    client = oidc_client(idp, session, tmp_path)
    first = await client.metadata()
    clock.now += METADATA_TTL_SECONDS - 1
    assert await client.metadata() is first
    assert idp.hits("/o/.well-known/openid-configuration") == 1
    clock.now += 2
    await client.metadata()
    assert idp.hits("/o/.well-known/openid-configuration") == 2


@pytest.mark.parametrize("oauth_status", [200, 404, 500])
async def test_optional_endpoints_come_from_oauth_metadata_when_it_can_be_read(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, oauth_status: int
) -> None:
    """An OpenID document without introspection or device endpoints is completed from the
    RFC 8414 document; one that cannot be read leaves them unset and discovery still works."""
    idp.serve_oidc()
    oauth = {"issuer": idp.url("/o"), "introspection_endpoint": idp.url("/o/introspect/")}
    idp.answer("/.well-known/oauth-authorization-server/o", oauth, status=oauth_status)
    metadata = await oidc_client(idp, session, tmp_path).metadata()
    assert metadata.token_endpoint == idp.url("/o/token/")
    expected = idp.url("/o/introspect/") if oauth_status == 200 else None
    assert metadata.introspection_endpoint == expected


async def test_a_refresh_without_prepared_metadata_sends_nothing(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, new_secret: NewSecret
) -> None:
    """A refresh never fetches discovery itself (that happens in prepare, before the intent):
    without prepared metadata it is refused as never sent, and nothing reaches the IdP."""
    idp.serve_oidc()
    with pytest.raises(IdpUnreachable, match="discovery has not succeeded"):
        await oidc_client(idp, session, tmp_path).refresh(Secret(new_secret("rt")))
    assert idp.seen == []


async def test_a_failed_refetch_keeps_the_metadata_already_held(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, clock: FakeMonotonic
) -> None:
    """Discovery that fails after its TTL does not take away the endpoints already known; it is
    tried again only after DISCOVERY_RETRY_SECONDS."""
    idp.serve_oidc()
    client = oidc_client(idp, session, tmp_path)
    first = await client.metadata()
    clock.now += METADATA_TTL_SECONDS + 1
    idp.answer("/o/.well-known/openid-configuration", b"down", status=502)
    assert await client.metadata() is first
    assert await client.metadata() is first
    assert idp.hits("/o/.well-known/openid-configuration") == 2
    clock.now += DISCOVERY_RETRY_SECONDS + 1
    idp.serve_oidc()
    await client.prepare()
    assert idp.hits("/o/.well-known/openid-configuration") == 3


async def test_a_failed_first_discovery_is_not_repeated_by_every_caller(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, clock: FakeMonotonic
) -> None:
    """Fifty refreshes queued behind a discovery that fails all get its failure; one request
    was made, not fifty, until DISCOVERY_RETRY_SECONDS have passed."""
    idp.answer("/o/.well-known/openid-configuration", b"down", status=503)
    client = oidc_client(idp, session, tmp_path)
    outcomes = await asyncio.gather(*(client.prepare() for _ in range(50)), return_exceptions=True)
    assert all(isinstance(outcome, IdpError) for outcome in outcomes)
    assert idp.hits("/o/.well-known/openid-configuration") == 1
    clock.now += DISCOVERY_RETRY_SECONDS + 1
    with pytest.raises(IdpError):
        await client.prepare()
    assert idp.hits("/o/.well-known/openid-configuration") == 2


async def test_prepare_fetches_the_keys_only_for_an_openid_provider(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An OpenID provider's refresh returns an ID token that is checked (and for some carries
    the access token), so its keys are fetched before the token leaves, once; a plain OAuth
    provider needs none."""
    idp.serve_oidc()
    await oidc_client(idp, session, tmp_path, scopes=["FGO"]).prepare()
    assert idp.hits(JWKS_PATH) == 0
    oidc = oidc_client(idp, session, tmp_path)
    await oidc.prepare()
    await oidc.prepare()
    assert idp.hits(JWKS_PATH) == 1


INTROSPECTION_ANSWERS: dict[str, tuple[int, object, bool | type[IdpError] | None]] = {
    "active": (200, {"active": True, "client_id": CLIENT_ID}, True),
    "active-without-client-id": (200, {"active": True}, True),
    "inactive": (200, {"active": False}, False),
    "active-for-another-client": (200, {"active": True, "client_id": "someone-else"}, False),
    "client-refused": (401, {"error": "invalid_client"}, None),
    "forbidden": (403, b"<html>no</html>", None),
    "unavailable": (503, b"busy", IdpNotProcessed),
    "gateway-error": (502, b"bad gateway", IdpAmbiguous),
    "not-an-answer": (200, {"status": "ok"}, IdpNotProcessed),
}


@pytest.mark.parametrize("case", INTROSPECTION_ANSWERS)
async def test_introspection_answers_whether_the_provider_holds_a_token_active(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, new_secret: NewSecret, case: str
) -> None:
    """RFC 7662: active, inactive, or (None) this client may not ask; a failure to answer is an
    IdpError, which decides nothing. The token is posted with its hint, never in the URL."""
    status, body, expected = INTROSPECTION_ANSWERS[case]
    idp.serve_oidc(introspection_endpoint=idp.url("/o/introspect/"))
    idp.answer("/o/introspect/", body, status=status)
    client = oidc_client(idp, session, tmp_path)
    await client.prepare()
    assert client.can_introspect
    token = new_secret("rt")
    if isinstance(expected, type):
        with pytest.raises(expected):
            await client.introspect(Secret(token))
    else:
        assert await client.introspect(Secret(token)) is expected
    sent = idp.last("/o/introspect/")
    assert sent.form["token"] == token
    assert sent.form["token_type_hint"] == "refresh_token"


async def test_without_an_introspection_endpoint_there_is_nothing_to_ask(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, new_secret: NewSecret
) -> None:
    """A provider that names no introspection endpoint cannot be asked: None, no request."""
    idp.serve_oidc()
    client = oidc_client(idp, session, tmp_path)
    await client.prepare()
    assert not client.can_introspect
    assert await client.introspect(Secret(new_secret("rt"))) is None
    assert idp.hits("/o/introspect/") == 0


UNUSABLE_DISCOVERY = {
    "absent": (404, b"", "no discovery document"),
    "server-error": (500, b"oops", "answered 500"),
    "html": (200, b"<html></html>", "not JSON"),
    "array": (200, b"[1, 2]", "not a JSON object"),
    "deeply-nested": (200, b"[" * 100_000, "not JSON"),
}


@pytest.mark.parametrize("case", UNUSABLE_DISCOVERY)
async def test_unusable_discovery_is_an_idp_error(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, case: str
) -> None:
    """Discovery that is absent, failing or not a JSON object is an IdpError, never a crash."""
    status, body, match = UNUSABLE_DISCOVERY[case]
    idp.answer("/o/.well-known/openid-configuration", body, status=status)
    with pytest.raises(IdpError, match=match):
        await oidc_client(idp, session, tmp_path).metadata()


# --- authorize URL and PKCE ----------------------------------------------------------------------


UNRESERVED = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def test_authorize_url_carries_code_flow_pkce_state_and_nonce(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The authorize URL asks for a code with S256 PKCE, our state, scopes and the OIDC nonce."""
    idp.serve_oidc()
    client = oidc_client(idp, session, tmp_path, scopes=["openid", "profile", "FGO"])
    pkce = Pkce.new()
    url = client.authorize_url(await client.metadata(), state="st-1", nonce="n-1", pkce=pkce)
    assert url.startswith(idp.url("/o/authorize/?"))
    assert _query(url) == {
        "response_type": ["code"],
        "client_id": [CLIENT_ID],
        "redirect_uri": [REDIRECT_URI],
        "scope": ["openid profile FGO"],
        "state": ["st-1"],
        "nonce": ["n-1"],
        "code_challenge": [_s256(pkce.verifier)],
        "code_challenge_method": ["S256"],
    }
    assert client.wants_id_token


async def test_authorize_url_without_openid_has_no_nonce(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A plain OAuth login (no openid scope) asks for no ID token and sends no nonce."""
    config = provider(
        tmp_path,
        scopes=["permission_management"],
        authorization_endpoint=idp.url("/authorize"),
        token_endpoint=idp.url("/token"),
    )
    client = ProviderClient(config, session)
    assert not client.wants_id_token
    url = client.authorize_url(await client.metadata(), state="st", nonce=None, pkce=Pkce.new())
    query = _query(url)
    assert "nonce" not in query
    assert query["scope"] == ["permission_management"]


async def test_authorization_endpoint_query_string_is_kept(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """An authorization_endpoint that already has a query keeps it and appends with "&"."""
    config = provider(
        tmp_path,
        authorization_endpoint="https://idp.example/authorize?tenant=t1&ui=compact",
        token_endpoint="https://idp.example/token",
    )
    client = ProviderClient(config, session)
    url = client.authorize_url(await client.metadata(), state="s", nonce="n", pkce=Pkce.new())
    assert url.startswith("https://idp.example/authorize?tenant=t1&ui=compact&")
    query = _query(url)
    assert query["tenant"] == ["t1"]
    assert query["ui"] == ["compact"]
    assert query["response_type"] == ["code"]


def test_pkce_verifiers_are_unreserved_long_enough_and_fresh() -> None:
    """Each verifier is 43-128 unreserved characters, differs from the last, and matches S256."""
    pairs = [Pkce.new() for _ in range(50)]
    for pair in pairs:
        assert UNRESERVED.fullmatch(pair.verifier)
        assert pair.challenge == _s256(pair.verifier)
    assert len({pair.verifier for pair in pairs}) == len(pairs)


# --- ID tokens through the client: JWKS fetching -------------------------------------------------


def id_token(idp: FakeIdP, key: RSAKey, **changes: object) -> Secret:
    """An ID token from the fake's issuer for CLIENT_ID, valid now, signed with `key`."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": idp.url("/o"),
        "aud": CLIENT_ID,
        "sub": "alice-sub",
        "iat": now,
        "exp": now + 300,
        "nonce": "n-1",
    }
    claims.update(changes)
    return Secret(jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key))


async def test_check_id_token_verifies_with_the_discovered_jwks_once(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, clock: FakeMonotonic
) -> None:
    """An ID token is checked against the JWKS from discovery, which is fetched once and kept."""
    idp.serve_oidc()
    client = oidc_client(idp, session, tmp_path)
    now = datetime.now(UTC)
    for _ in range(3):
        claims = await client.check_id_token(id_token(idp, KEY_A), nonce="n-1", now=now)
        assert claims["sub"] == "alice-sub"
    assert idp.hits(JWKS_PATH) == 1


async def test_unknown_kid_refetches_the_jwks_once_then_waits_out_the_interval(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, clock: FakeMonotonic
) -> None:
    """After a key rotation an unknown kid refetches once and succeeds; another one right after
    does not refetch again within JWKS_REFETCH_INTERVAL."""
    idp.serve_oidc()
    client = oidc_client(idp, session, tmp_path)
    now = datetime.now(UTC)
    await client.check_id_token(id_token(idp, KEY_A), nonce="n-1", now=now)
    assert idp.hits(JWKS_PATH) == 1

    clock.now += JWKS_REFETCH_INTERVAL  # the cached set is old enough to refetch
    idp.answer(JWKS_PATH, _jwks(KEY_A, KEY_B))  # the IdP rotated
    claims = await client.check_id_token(id_token(idp, KEY_B), nonce="n-1", now=now)
    assert claims["sub"] == "alice-sub"
    assert idp.hits(JWKS_PATH) == 2

    clock.now += JWKS_REFETCH_INTERVAL - 1
    with pytest.raises(IdTokenInvalid, match="unknown signing key id 'key-c'"):
        await client.check_id_token(id_token(idp, KEY_C), nonce="n-1", now=now)
    assert idp.hits(JWKS_PATH) == 2
    # Known keys keep working meanwhile, from the cache.
    await client.check_id_token(id_token(idp, KEY_A), nonce="n-1", now=now)
    assert idp.hits(JWKS_PATH) == 2


async def test_check_id_token_rejects_a_bad_token_from_the_provider(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The client applies the claim checks with its own issuer and client_id."""
    idp.serve_oidc()
    client = oidc_client(idp, session, tmp_path)
    now = datetime.now(UTC)
    with pytest.raises(IdTokenInvalid, match="aud"):
        await client.check_id_token(id_token(idp, KEY_A, aud="other"), nonce="n-1", now=now)
    with pytest.raises(IdTokenInvalid, match="nonce"):
        await client.check_id_token(id_token(idp, KEY_A), nonce="n-2", now=now)


async def test_at_hash_is_checked_through_the_client(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With the access token given, an at_hash that does not match it is refused."""
    idp.serve_oidc()
    client = oidc_client(idp, session, tmp_path)
    digest = hashlib.sha256(b"at-right").digest()[:16]
    good = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    token = id_token(idp, KEY_A, at_hash=good)
    now = datetime.now(UTC)
    await client.check_id_token(token, nonce="n-1", now=now, access_token=Secret("at-right"))
    with pytest.raises(IdTokenInvalid, match="at_hash"):
        await client.check_id_token(token, nonce="n-1", now=now, access_token=Secret("at-wrong"))


async def test_issuer_with_trailing_slash_accepts_tokens_from_the_document_issuer(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """iss is compared with the issuer discovery confirmed, not the config's spelling of it."""
    idp.serve_oidc()
    client = ProviderClient(provider(tmp_path, issuer=idp.url("/o/")), session)
    claims = await client.check_id_token(id_token(idp, KEY_A), nonce="n-1", now=datetime.now(UTC))
    assert claims["iss"] == idp.url("/o")


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, b"oops"), (200, b"<html></html>"), (200, b"[" * 100_000), (200, b'{"keys": null}')],
    ids=["server-error", "html", "deeply-nested", "keys-null"],
)
async def test_unusable_jwks_is_an_idp_error(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, status: int, body: bytes
) -> None:
    """A JWKS that fails or does not parse is an IdpError, never a crash."""
    idp.serve_oidc()
    idp.answer(JWKS_PATH, body, status=status)
    client = oidc_client(idp, session, tmp_path)
    with pytest.raises(IdpError, match="jwks"):
        await client.check_id_token(id_token(idp, KEY_A), nonce="n-1", now=datetime.now(UTC))


async def test_provider_without_jwks_uri_cannot_check_id_tokens(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """No jwks_uri means no ID token can be trusted: IdTokenInvalid, not a silent pass."""
    idp.serve_oidc(jwks_uri=None)
    client = oidc_client(idp, session, tmp_path)
    with pytest.raises(IdTokenInvalid, match="no jwks_uri"):
        await client.check_id_token(id_token(idp, KEY_A), nonce="n-1", now=datetime.now(UTC))


# --- revocation ----------------------------------------------------------------------------------


async def test_revoke_posts_token_and_hint_with_client_auth(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, new_secret: NewSecret
) -> None:
    """Revocation posts the token and its type hint, authenticated like token calls (RFC 7009)."""
    idp.serve_oidc()
    client_secret = new_secret("cs")
    secret_file = _write_secret(tmp_path, client_secret)
    client = oidc_client(
        idp,
        session,
        tmp_path,
        secret=read_client_secret(secret_file),
        client_auth="client_secret_basic",
        client_secret_file=str(secret_file),
    )
    refresh = new_secret("rt")
    assert await client.revoke(Secret(refresh)) is True
    sent = idp.last("/o/revoke/")
    assert sent.method == "POST"
    assert sent.form == {"token": refresh, "token_type_hint": "refresh_token"}
    expected = base64.b64encode(f"{CLIENT_ID}:{client_secret}".encode()).decode()
    assert sent.headers["Authorization"] == f"Basic {expected}"
    assert await client.revoke(Secret("at-1"), "access_token") is True
    assert idp.last("/o/revoke/").form["token_type_hint"] == "access_token"


async def test_revoke_without_an_endpoint_returns_false(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A provider with no revocation endpoint anywhere cannot revoke: False, and no POST."""
    idp.serve_oidc(revocation_endpoint=None)
    client = oidc_client(idp, session, tmp_path)
    assert await client.revoke(Secret("rt-1")) is False
    assert all(seen.method == "GET" for seen in idp.seen)


async def test_revoke_503_is_an_idp_error_naming_the_revocation_endpoint(
    idp: FakeIdP, session: aiohttp.ClientSession, tmp_path: Path, new_secret: NewSecret
) -> None:
    """A 503 from the revocation endpoint is an IdpError (the grant is kept), never a success."""
    idp.serve_oidc()
    idp.answer("/o/revoke/", b"busy", status=503, headers={"Retry-After": "9"})
    refresh = new_secret("rt")
    with pytest.raises(IdpError) as info:
        await oidc_client(idp, session, tmp_path).revoke(Secret(refresh))
    assert "revocation endpoint" in str(info.value)
    assert info.value.retry_after == 9.0
    assert refresh not in str(info.value)
