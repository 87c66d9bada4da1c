"""A tiny OpenID provider for login tests that need what the shared fakes cannot do.

`TinyIdP` runs on aiohttp's real test server and does the code flow properly (PKCE S256
checked, codes single use, consent at once), answering with an access token, a refresh token
and an RS256 ID token. Two knobs:

- `flaw`: the ID token has exactly one thing wrong: "nonce" (another login's), "no-nonce",
  "aud" (another client), "iss" (another issuer), "exp" (expired an hour ago), "signature"
  (another key, same kid) or "alg-none" (unsigned); "" for none.
- `barrier`: when set (an `asyncio.Barrier(n)`), each token answer waits until n token
  requests are waiting, then all go at once, so concurrent logins reach the broker in lockstep.

It also does the device authorization grant (RFC 8628) the way a test scripts it:
`device_answers` lists the errors its token endpoint gives device-code polls
("authorization_pending", "slow_down", "expired_token", ...) before it issues tokens, and
`device_polls` records when each poll arrived (time.monotonic). Its discovery names the device
endpoint unless `advertise_device=False` (a config then has to); with `device_refusal` set to
an error code, the device endpoint answers 400 with it instead of codes. `refresh_tokens`
(default True) set to False answers without a refresh token, as providers that issue one only
at the first consent do; `sub` names the account every ID token speaks for. With `claim` set
(netID's shape), the access token travels in that ID token claim as {access_token, token_type,
expires_in} instead of at the top level. Its token endpoint also takes the refresh_token grant
for a refresh token it issued (single use: each is rotated), answering as for a code.

Every token it issues comes from the test's `new_secret`, so the session's leak scan knows them;
`issued` lists them in order (access, refresh, ID token per exchange); `revoked` lists what
was revoked at its RFC 7009 endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import RSAKey

CLIENT_ID = "tiny-test"
HOLD_TIMEOUT = 10.0  # seconds a token answer waits at the barrier for the others


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class _Code:
    redirect_uri: str
    challenge: str
    nonce: str | None


class TinyIdP:
    """A code-flow OpenID provider; see the module docstring for `flaw` and `barrier`."""

    def __init__(self, make_secret: Callable[[str], str], *, flaw: str = "") -> None:
        self.flaw = flaw
        self.barrier: asyncio.Barrier | None = None
        self.device_answers: list[str] = []
        self.device_interval = 1
        self.device_polls: list[float] = []
        self.device_codes: list[str] = []  # every device code it handed out
        self.advertise_device = True
        self.device_refusal: str | None = None
        self.refresh_tokens = True
        self.sub = "tiny-sub"
        self.claim: str | None = None
        self._live_refresh_tokens: set[str] = set()
        self.token_requests = 0
        self.issued: list[str] = []  # every token it handed out
        self.revoked: list[tuple[str, str]] = []  # (token, token_type_hint) per revocation
        self._make_secret = make_secret
        self._kid = secrets.token_hex(8)
        self._key = RSAKey.generate_key(2048, parameters={"kid": self._kid}, private=True)
        self._codes: dict[str, _Code] = {}
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_post("/revoke", self._revoke)
        app.router.add_post("/device", self._device_authorization)
        self._server = TestServer(app, host="127.0.0.1")

    async def start(self) -> None:
        await self._server.start_server()

    async def close(self) -> None:
        await self._server.close()

    @property
    def issuer(self) -> str:
        return str(self._server.make_url("")).rstrip("/")

    @property
    def device_endpoint(self) -> str:
        return f"{self.issuer}/device"

    async def _discovery(self, _request: web.Request) -> web.Response:
        document = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "revocation_endpoint": f"{self.issuer}/revoke",
            "id_token_signing_alg_values_supported": ["RS256"],
        }
        if self.advertise_device:
            document["device_authorization_endpoint"] = self.device_endpoint
        return web.json_response(document)

    async def _device_authorization(self, request: web.Request) -> web.Response:
        """RFC 8628 section 3.2: codes for a device login; the page itself is not served."""
        form = await request.post()
        assert form.get("client_id") == CLIENT_ID
        if self.device_refusal is not None:
            return web.json_response({"error": self.device_refusal}, status=400)
        device_code = self._make_secret("tiny-device-code")
        self.device_codes.append(device_code)
        user_code = secrets.token_hex(4).upper()
        return web.json_response(
            {
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": f"{self.issuer}/activate",
                "verification_uri_complete": f"{self.issuer}/activate?code={user_code}",
                "expires_in": 600,
                "interval": self.device_interval,
            }
        )

    async def _device_poll(self, form: Any) -> web.Response:
        self.device_polls.append(time.monotonic())
        if form.get("device_code") not in self.device_codes:
            return web.json_response({"error": "invalid_grant"}, status=400)
        if self.device_answers:
            return web.json_response({"error": self.device_answers.pop(0)}, status=400)
        return self._tokens(nonce=None)

    async def _jwks(self, _request: web.Request) -> web.Response:
        return web.json_response({"keys": [self._key.as_dict(private=False)]})

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        assert q["client_id"] == CLIENT_ID
        assert q["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(16)
        self._codes[code] = _Code(q["redirect_uri"], q["code_challenge"], q.get("nonce"))
        raise web.HTTPFound(f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}")

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        if form.get("grant_type") == "urn:ietf:params:oauth:grant-type:device_code":
            return await self._device_poll(form)
        if form.get("grant_type") == "refresh_token":
            presented = str(form.get("refresh_token"))
            if presented not in self._live_refresh_tokens:
                return web.json_response({"error": "invalid_grant"}, status=400)
            self._live_refresh_tokens.discard(presented)
            return self._tokens(nonce=None)
        if self.barrier is not None:
            await asyncio.wait_for(self.barrier.wait(), HOLD_TIMEOUT)
        code = self._codes.pop(str(form.get("code")), None)
        if (
            code is None
            or form.get("redirect_uri") != code.redirect_uri
            or _s256(str(form.get("code_verifier"))) != code.challenge
        ):
            return web.json_response({"error": "invalid_grant"}, status=400)
        return self._tokens(code.nonce)

    def _tokens(self, nonce: str | None) -> web.Response:
        access_token = self._make_secret("tiny-at")
        refresh_token = self._make_secret("tiny-rt")
        carried = {"access_token": access_token, "token_type": "bearer", "expires_in": 3600}
        id_token = self._id_token(nonce, {} if self.claim is None else {self.claim: carried})
        self.issued += [access_token, refresh_token, id_token]
        answer = {
            "access_token": access_token,
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": 3600,
            "id_token": id_token,
        }
        if self.claim is not None:
            del answer["access_token"]
        if self.refresh_tokens:
            self._live_refresh_tokens.add(refresh_token)
        else:
            del answer["refresh_token"]
        return web.json_response(answer)

    async def _revoke(self, request: web.Request) -> web.Response:
        """RFC 7009: record what was revoked; an unknown token is a success too."""
        form = await request.post()
        self.revoked.append((str(form.get("token")), str(form.get("token_type_hint"))))
        return web.Response(status=200)

    def _id_token(self, nonce: str | None, extra: dict[str, Any]) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "sub": self.sub,
            "iat": now,
            "exp": now + 600,
            **extra,
        }
        if nonce is not None:  # the device grant has none
            claims["nonce"] = nonce
        header = {"alg": "RS256", "kid": self._kid}
        key = self._key
        if self.flaw == "nonce":
            claims["nonce"] = "a-nonce-from-another-login"
        elif self.flaw == "no-nonce":
            claims.pop("nonce", None)
        elif self.flaw == "aud":
            claims["aud"] = "another-client"
        elif self.flaw == "iss":
            claims["iss"] = "https://attacker.example"
        elif self.flaw == "exp":
            claims |= {"iat": now - 7200, "exp": now - 3600}
        elif self.flaw == "signature":
            key = RSAKey.generate_key(2048, parameters={"kid": self._kid}, private=True)
        elif self.flaw == "alg-none":
            return f"{_b64({'alg': 'none', 'kid': self._kid})}.{_b64(claims)}."
        return jwt.encode(header, claims, key)


StartTinyIdP = Callable[..., Awaitable[TinyIdP]]


@pytest.fixture
async def tiny_idp_factory(new_secret: Callable[[str], str]) -> AsyncIterator[StartTinyIdP]:
    """Start TinyIdPs on demand (their tokens come from new_secret); all closed at the end."""
    started: list[TinyIdP] = []

    async def start(*, flaw: str = "") -> TinyIdP:
        idp = TinyIdP(new_secret, flaw=flaw)
        await idp.start()
        started.append(idp)
        return idp

    yield start
    for idp in started:
        await idp.close()


def tiny(idp: TinyIdP) -> dict[str, object]:
    """The provider entry for a TinyIdP."""
    return {"issuer": idp.issuer, "client_id": CLIENT_ID, "scopes": ["openid", "profile"]}
