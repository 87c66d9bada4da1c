"""netID-style fake providers: real aiohttp servers on 127.0.0.1, not mocks.

Modelled on shared/seeds/001 (netID Broker, permission_management): /authorize consents at
once and redirects back with `code` and `state`; PKCE S256 is required and checked for real;
the scope picks the token endpoint's answer:

- `openid permission_management` (SSO): a signed RS256 ID token (iss, aud, sub, iat, exp,
  auth_time, nonce) whose claim `permission_management` = {access_token, token_type: "bearer",
  expires_in} carries the usable access token. No top-level access token, unless
  `sso_userinfo_token=True` adds one that is good only for `openid` (not for permission
  management), as a full OIDC provider would.
- `permission_management` alone: {access_token, scope, token_type, expires_in} only.

No refresh token in either shape. GET /check with `Authorization: Bearer` says whether an
access token is one this fake issued and is still unexpired, and for which scope. The issuer
ends in a slash, as netID's does (https://broker.netid.de/).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import RSAKey

CLIENT_ID = "netid-test"
SSO_SCOPE = "openid permission_management"
TOKEN_ONLY_SCOPE = "permission_management"
CODE_LIFETIME = 60.0
ID_TOKEN_LIFETIME = 600


@dataclass(frozen=True)
class _Code:
    client_id: str
    redirect_uri: str
    scope: str
    challenge: str
    nonce: str | None
    sub: str
    expires: float


@dataclass(frozen=True)
class _Issued:
    sub: str
    scope: str
    expires: float


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _redirect_allowed(uri: str, registered: list[str]) -> bool:
    """Exact match, except that http://127.0.0.1 admits any port (RFC 8252, as DOT does)."""
    got = urlsplit(uri)
    for allowed in map(urlsplit, registered):
        loopback = allowed.scheme == "http" and allowed.hostname == "127.0.0.1"
        if (got.scheme, got.hostname, got.path, got.query) == (
            allowed.scheme,
            allowed.hostname,
            allowed.path,
            allowed.query,
        ) and (loopback or got.port == allowed.port):
            return True
    return False


def _oauth_error(error: str, status: int = 400) -> web.Response:
    return web.json_response({"error": error}, status=status, headers={"Cache-Control": "no-store"})


class NetIDFake:
    """One fake netID broker. Set `approve = False` to deny the next logins, `subject` to
    change who logs in, `clock_offset` (seconds) to age every token without sleeping."""

    def __init__(
        self,
        *,
        client_id: str = CLIENT_ID,
        redirect_uris: list[str] | None = None,
        access_token_lifetime: int = 500,
        sso_userinfo_token: bool = False,
    ) -> None:
        self.client_id = client_id
        self.redirect_uris = redirect_uris or ["http://127.0.0.1/callback"]
        self.access_token_lifetime = access_token_lifetime
        self.sso_userinfo_token = sso_userinfo_token
        self.subject = "pairwise-" + secrets.token_urlsafe(12)
        self.approve = True
        self.clock_offset = 0.0
        self.stats: Counter[str] = Counter()
        self.kid = secrets.token_hex(8)
        self._key = RSAKey.generate_key(
            2048, parameters={"kid": self.kid, "use": "sig", "alg": "RS256"}, private=True
        )
        self._codes: dict[str, _Code] = {}
        self._tokens: dict[str, _Issued] = {}
        self._server: TestServer | None = None

    # -- lifecycle and addresses -------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_get("/check", self._check)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return str(self._server.make_url("")).rstrip("/")

    @property
    def issuer(self) -> str:
        return f"{self.url}/"

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    @property
    def authorize_endpoint(self) -> str:
        return f"{self.url}/authorize"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/token"

    @property
    def check_endpoint(self) -> str:
        return f"{self.url}/check"

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._key.as_dict(private=False)]}

    def _now(self) -> float:
        return time.time() + self.clock_offset

    # -- endpoints ---------------------------------------------------------------------------

    async def _discovery(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": self.authorize_endpoint,
                "token_endpoint": self.token_endpoint,
                "jwks_uri": f"{self.url}/jwks",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "permission_management"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["none", "client_secret_basic"],
            }
        )

    async def _jwks(self, _request: web.Request) -> web.Response:
        return web.json_response(self.jwks)

    async def _authorize(self, request: web.Request) -> web.Response:
        self.stats["authorize_requests"] += 1
        q = request.query
        redirect_uri = q.get("redirect_uri", "")
        if q.get("client_id") != self.client_id or not _redirect_allowed(
            redirect_uri, self.redirect_uris
        ):
            # Never redirect to an unverified redirect_uri: an error page, as real IdPs do.
            return web.Response(status=400, text="unknown client or redirect_uri\n")
        scope = " ".join(sorted(q.get("scope", "").split()))
        if q.get("response_type") != "code":
            error = "unsupported_response_type"
        elif not q.get("code_challenge") or q.get("code_challenge_method") != "S256":
            error = "invalid_request"
        elif scope not in (SSO_SCOPE, TOKEN_ONLY_SCOPE):
            error = "invalid_scope"
        elif not self.approve:
            error = "access_denied"
        else:
            error = ""
        params = {"error": error} if error else {"code": self._new_code(q, redirect_uri, scope)}
        if "state" in q:
            params["state"] = q["state"]
        raise web.HTTPFound(f"{redirect_uri}?{urlencode(params)}")

    def _new_code(self, q: Any, redirect_uri: str, scope: str) -> str:
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Code(
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            challenge=q["code_challenge"],
            nonce=q.get("nonce"),
            sub=self.subject,
            expires=self._now() + CODE_LIFETIME,
        )
        return code

    async def _token(self, request: web.Request) -> web.Response:
        self.stats["token_requests"] += 1
        code = await self._redeem(request)
        if isinstance(code, web.Response):
            return code
        self.stats["tokens_issued"] += 1
        access_token = self._issue(code.sub, TOKEN_ONLY_SCOPE)
        if code.scope == TOKEN_ONLY_SCOPE:
            body: dict[str, Any] = {
                "access_token": access_token,
                "scope": TOKEN_ONLY_SCOPE,
                "token_type": "Bearer",
                "expires_in": self.access_token_lifetime,
            }
        else:
            body = {"id_token": self._id_token(code, access_token), "scope": SSO_SCOPE}
            if self.sso_userinfo_token:
                body |= {
                    "access_token": self._issue(code.sub, "openid"),
                    "token_type": "Bearer",
                    "expires_in": self.access_token_lifetime,
                }
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def _redeem(self, request: web.Request) -> _Code | web.Response:
        """The code of a valid exchange (spent now), or the error response."""
        form = await request.post()
        if form.get("grant_type") != "authorization_code":
            return _oauth_error("unsupported_grant_type")
        code = self._codes.pop(str(form.get("code", "")), None)  # single use
        verifier = str(form.get("code_verifier", ""))
        client_id = str(form.get("client_id", "")) or _basic_client_id(request)
        if code is None or code.expires <= self._now():
            error = _oauth_error("invalid_grant")
        elif client_id != code.client_id:
            error = _oauth_error("invalid_client", 401)
        elif form.get("redirect_uri") != code.redirect_uri:
            error = _oauth_error("invalid_grant")
        elif not verifier:
            error = _oauth_error("invalid_request")
        elif not secrets.compare_digest(_s256(verifier), code.challenge):
            error = _oauth_error("invalid_grant")
        else:
            return code
        return error

    def _issue(self, sub: str, scope: str) -> str:
        token = "nid-" + secrets.token_urlsafe(32)
        self._tokens[token] = _Issued(sub, scope, self._now() + self.access_token_lifetime)
        return token

    def _id_token(self, code: _Code, access_token: str) -> str:
        now = int(self._now())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": code.client_id,
            "sub": code.sub,
            "iat": now,
            "exp": now + ID_TOKEN_LIFETIME,
            "auth_time": now,
            "permission_management": {
                "access_token": access_token,
                "token_type": "bearer",
                "expires_in": self.access_token_lifetime,
            },
        }
        if code.nonce is not None:
            claims["nonce"] = code.nonce
        return jwt.encode({"alg": "RS256", "kid": self.kid}, claims, self._key)

    async def _check(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        issued = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if issued is None or issued.expires <= self._now():
            return web.json_response({"active": False}, status=401)
        return web.json_response(
            {"active": True, "sub": issued.sub, "scope": issued.scope, "exp": int(issued.expires)}
        )


def _basic_client_id(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        return base64.b64decode(value).decode().partition(":")[0]
    except ValueError:
        return ""


class NetIDFactory(Protocol):
    """What `netid_factory` yields: start a NetIDFake with these options."""

    async def __call__(
        self,
        *,
        client_id: str = CLIENT_ID,
        redirect_uris: list[str] | None = None,
        access_token_lifetime: int = 500,
        sso_userinfo_token: bool = False,
    ) -> NetIDFake: ...


@pytest.fixture
async def netid_factory() -> AsyncIterator[NetIDFactory]:
    """Start netID fakes on demand; all are closed when the test ends."""
    started: list[NetIDFake] = []

    async def start(
        *,
        client_id: str = CLIENT_ID,
        redirect_uris: list[str] | None = None,
        access_token_lifetime: int = 500,
        sso_userinfo_token: bool = False,
    ) -> NetIDFake:
        fake = NetIDFake(
            client_id=client_id,
            redirect_uris=redirect_uris,
            access_token_lifetime=access_token_lifetime,
            sso_userinfo_token=sso_userinfo_token,
        )
        await fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in reversed(started):
        await fake.close()
