"""Starting a login: the authorize URL, PKCE end to end, and the requests that are refused.

The URL is checked parameter by parameter; the PKCE verifier is read back from the login row it
is sealed in (with the keyring file) to prove the challenge is BASE64URL(SHA256(verifier)), and
a real django-oauth-toolkit IdP, which requires PKCE, proves the pair end to end.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from urllib.parse import urlsplit

from tests import inprocess
from tests.daemon import free_port
from tests.idp.browser import Pkce, login
from tests.idp.fixture import DjangoIdP
from tests.inprocess import (
    TECHNIEK_SCOPES,
    assert_failure_page,
    assert_login_failed,
    code_exchanges,
    serving_broker,
    techniek,
)

shared_idp = inprocess.shared_idp

PROVIDER, USER = "techniek", "alice"
PKCE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")


def s256(verifier: str) -> str:
    """BASE64URL(SHA256(verifier)) without padding (RFC 7636, 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def test_the_authorize_url_carries_the_code_flow_state_nonce_and_an_s256_challenge(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """The URL has exactly the code-flow parameters; its challenge is S256 of the sealed
    verifier (erased once the login finishes), and its nonce comes back in the ID token."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        started = await broker.start_login(PROVIDER, USER)
        url = urlsplit(started.authorize_url)
        assert f"{url.scheme}://{url.netloc}{url.path}" == shared_idp.authorize_endpoint
        assert set(started.params) == {
            "response_type",
            "client_id",
            "redirect_uri",
            "scope",
            "state",
            "nonce",
            "code_challenge",
            "code_challenge_method",
        }
        assert started.param("response_type") == "code"
        assert started.param("client_id") == "broker-test"
        assert started.param("redirect_uri") == broker.redirect_uri
        assert started.param("scope") == "openid profile FGO FGOWS"
        assert started.param("code_challenge_method") == "S256"
        challenge = started.param("code_challenge")
        assert S256_CHALLENGE.fullmatch(challenge)
        verifier = await broker.sealed_verifier(started.id)
        assert verifier is not None
        assert PKCE_VERIFIER.fullmatch(verifier)
        assert challenge == s256(verifier)
        assert len(started.param("state")) >= 32
        assert len(started.param("nonce")) >= 32

        result = await login(started.authorize_url, USER, "alice-password", follow=True)
        assert result.callback_status == 200, result.callback_body
        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.claims["nonce"] == started.param("nonce")
        assert stored.claims["aud"] == "broker-test"
        assert stored.claims["iss"] == shared_idp.issuer
        assert await broker.sealed_verifier(started.id) is None  # forgotten once finished
        broker.assert_not_logged(verifier, result.code)


async def test_a_challenge_that_does_not_match_the_verifier_fails_the_exchange(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """PKCE end to end: if the IdP bound the code to another challenge, the broker's verifier
    is refused (invalid_grant) and the login fails."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        started = await broker.start_login(PROVIDER, USER)
        tampered = started.authorize_url.replace(
            started.param("code_challenge"), Pkce.new().challenge
        )
        before = code_exchanges(shared_idp)
        result = await login(tampered, USER, "alice-password", follow=True)
        assert_failure_page(result, "invalid_grant")
        await assert_login_failed(broker, started, "invalid_grant")
        assert code_exchanges(shared_idp) == before + 1


async def test_logins_never_share_state_nonce_or_challenge(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Eight logins for the same grant carry eight different states, nonces and challenges."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        logins = [await broker.start_login(PROVIDER, USER) for _ in range(8)]
        values = [
            login_.param(name) for login_ in logins for name in ("state", "nonce", "code_challenge")
        ]
        assert len(set(values)) == len(values) == 24
        assert len({login_.id for login_ in logins}) == 8


async def test_a_provider_without_openid_gets_no_nonce_and_logs_in_without_an_id_token(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Plain OAuth (no openid scope): no nonce in the URL, and the login stores a grant with
    no sub whose token the IdP issued."""
    provider = techniek(shared_idp, scopes=["profile", "FGO"])
    async with serving_broker(tmp_path, log_dir, {PROVIDER: provider}) as broker:
        started = await broker.start_login(PROVIDER, USER)
        assert "nonce" not in started.params
        assert started.param("scope") == "profile FGO"
        verifier = await broker.sealed_verifier(started.id)
        assert verifier is not None
        assert started.param("code_challenge") == s256(verifier)
        result = await login(started.authorize_url, USER, "alice-password", follow=True)
        assert result.callback_status == 200, result.callback_body
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["state"], grant["generation"]) == (None, "active", 1)
        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.tokens.id_token is None
        token = await broker.access_token(PROVIDER, USER)
        assert stored.tokens.access_token is not None
        assert token == stored.tokens.access_token.reveal()
        broker.assert_not_logged(token, result.code)


async def test_a_login_for_an_unknown_provider_or_a_bad_user_label_is_refused(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """POST /v1/logins answers 400 bad_request for an unconfigured provider, a user label
    outside [A-Za-z0-9._@-]{1,128} or unknown fields; an unknown login id is 404."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        for body in (
            {"provider": "nowhere", "user": USER},
            {"provider": PROVIDER, "user": "alice/../bob"},
            {"provider": PROVIDER, "user": "x" * 129},
            {"provider": PROVIDER, "user": USER, "force": "yes"},
            {"provider": PROVIDER, "user": USER, "scope": "openid"},
        ):
            reply = await broker.call("POST", "/v1/logins", body)
            assert reply.status == 400, (body, reply.text)
            assert reply.json()["code"] == "bad_request"
        reply = await broker.call("GET", "/v1/logins/no-such-login")
        assert reply.status == 404, reply.text


async def test_a_login_while_the_idp_is_unreachable_is_503_with_retry_after(
    tmp_path: Path, log_dir: Path
) -> None:
    """When discovery cannot reach the IdP, POST /v1/logins is 503 token_unavailable with
    Retry-After, not a URL that could never work."""
    provider = {
        "issuer": f"http://127.0.0.1:{free_port()}/o",
        "client_id": "broker-test",
        "scopes": list(TECHNIEK_SCOPES),
    }
    async with serving_broker(tmp_path, log_dir, {PROVIDER: provider}) as broker:
        reply = await broker.call("POST", "/v1/logins", {"provider": PROVIDER, "user": USER})
        assert reply.status == 503, reply.text
        assert reply.json()["code"] == "token_unavailable"
        assert int(reply.headers["Retry-After"]) > 0
        assert "techniek" in reply.json()["detail"]
