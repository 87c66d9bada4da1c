"""The test identity providers work for real: DOT's flows, rotation, faults, and the netID fakes."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import KeySet, KeySetSerialization

from tests.idp import fixture as idp_fixture
from tests.idp import netid as netid_module
from tests.idp.browser import Pkce, authorize_url, login
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory
from tests.idp.netid import SSO_SCOPE, TOKEN_ONLY_SCOPE, NetIDFactory, NetIDFake

django_idp_factory = idp_fixture.django_idp_factory
netid_factory = netid_module.netid_factory

REGISTERED = "http://127.0.0.1/callback"  # DOT ignores the port of a 127.0.0.1 redirect URI
REDIRECT = "http://127.0.0.1:9/callback"  # nothing listens; the helper stops before it
SCOPE = "openid profile FGO FGOWS"
TIMEOUT = aiohttp.ClientTimeout(total=15)


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(url, headers=headers, allow_redirects=False) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def _post(url: str, data: dict[str, str], limit: float = 15) -> tuple[int, Any]:
    client_timeout = aiohttp.ClientTimeout(total=limit)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.post(url, data=data) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def _authorize(
    idp: DjangoIdP, user: str = "alice", *, pkce: Pkce | None = None, nonce: str = "n-1"
) -> tuple[str, Pkce]:
    """Log in through the real forms; return the authorization code and its PKCE pair."""
    pkce = pkce or Pkce.new()
    state = secrets.token_urlsafe(8)
    url = authorize_url(
        idp.authorize_endpoint,
        client_id=idp.client_id,
        redirect_uri=REDIRECT,
        scope=SCOPE,
        state=state,
        nonce=nonce,
        code_challenge=pkce.challenge,
    )
    result = await login(url, user, f"{user}-password")
    assert result.state == state
    assert result.code is not None, result.redirect_url
    return result.code, pkce


async def _exchange(idp: DjangoIdP, code: str, verifier: str | None) -> tuple[int, Any]:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": idp.client_id,
    }
    if verifier is not None:
        data["code_verifier"] = verifier
    return await _post(idp.token_endpoint, data)


async def _tokens(idp: DjangoIdP, user: str = "alice") -> dict[str, Any]:
    code, pkce = await _authorize(idp, user)
    status, body = await _exchange(idp, code, pkce.verifier)
    assert status == 200, body
    return dict(body)


async def _refresh(idp: DjangoIdP, refresh_token: str, limit: float = 15) -> tuple[int, Any]:
    data = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": "broker-test",
    }
    return await _post(idp.token_endpoint, data, limit)


def _decode(token: str, jwks: KeySetSerialization) -> dict[str, Any]:
    return dict(jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256"]).claims)


@pytest.fixture
def idp(django_idp_factory: DjangoIdPFactory) -> DjangoIdP:
    """One IdP with the defaults: no grace, reuse protection on."""
    return django_idp_factory(redirect_uris=[REGISTERED])


# -- django-oauth-toolkit ------------------------------------------------------------------------


async def test_id_token_iss_equals_discovery_issuer(idp: DjangoIdP) -> None:
    """The ID token is RS256-signed by a JWKS key and its iss is the discovery issuer, .../o."""
    status, discovery = await _get(idp.discovery_url)
    assert status == 200
    assert discovery["issuer"] == idp.issuer == f"http://127.0.0.1:{idp.port}/o"
    tokens = await _tokens(idp)
    _, jwks = await _get(discovery["jwks_uri"])
    claims = _decode(tokens["id_token"], jwks)
    assert claims["iss"] == discovery["issuer"]
    assert claims["aud"] == "broker-test"
    assert claims["nonce"] == "n-1"
    assert claims["sub"] == idp.subs["alice"] != idp.subs["bob"]


async def test_revocation_is_advertised_by_rfc8414_metadata_only(idp: DjangoIdP) -> None:
    """DOT lists revocation_endpoint in its RFC 8414 document (both locations), not in OIDC's."""
    _, oidc = await _get(idp.discovery_url)
    assert "revocation_endpoint" not in oidc
    for url in (
        f"{idp.issuer}/.well-known/oauth-authorization-server",
        f"{idp.url}/.well-known/oauth-authorization-server/o",
    ):
        status, meta = await _get(url)
        assert status == 200
        assert meta["issuer"] == idp.issuer
        assert meta["revocation_endpoint"] == idp.revocation_endpoint
        assert meta["token_endpoint"] == oidc["token_endpoint"]
        assert "S256" in meta["code_challenge_methods_supported"]


async def test_code_flow_yields_tokens_that_userinfo_accepts(idp: DjangoIdP) -> None:
    """Login, consent and a PKCE code exchange give a full token set that userinfo accepts."""
    tokens = await _tokens(idp, "bob")
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 36000
    assert tokens["scope"] == SCOPE
    assert tokens["refresh_token"]
    status, claims = idp.userinfo(tokens["access_token"])
    assert status == 200
    assert claims == {"sub": idp.subs["bob"], "preferred_username": "bob"}
    assert idp.stats()["token_requests"] == {"authorization_code": 1}


async def test_refresh_rotates_and_replay_revokes_the_family(idp: DjangoIdP) -> None:
    """A refresh rotates; replaying the old token is invalid_grant and revokes the new pair too."""
    first = await _tokens(idp)
    status, second = await _refresh(idp, first["refresh_token"])
    assert status == 200
    assert second["refresh_token"] != first["refresh_token"]
    assert idp.userinfo(first["access_token"])[0] == 401  # rotation deletes the old access token
    assert idp.userinfo(second["access_token"])[0] == 200

    status, body = await _refresh(idp, first["refresh_token"])
    assert (status, body) == (400, {"error": "invalid_grant"})
    assert idp.userinfo(second["access_token"])[0] == 401
    assert (await _refresh(idp, second["refresh_token"]))[0] == 400
    stats = idp.stats()
    assert stats["refresh_ok"] == 1
    assert stats["refresh_failed"] == {"invalid_grant": 2}
    assert stats["spent_refresh_presented"] == 2
    assert stats["reuse_family_revocations"] == 2
    assert stats["in_grace_replays"] == 0


async def test_replay_without_reuse_protection_spares_the_family(
    django_idp_factory: DjangoIdPFactory,
) -> None:
    """With reuse protection off a replay is refused but the rotated pair stays valid."""
    idp = django_idp_factory(redirect_uris=[REGISTERED], reuse_protection=False)
    first = await _tokens(idp)
    _, second = await _refresh(idp, first["refresh_token"])
    assert (await _refresh(idp, first["refresh_token"]))[0] == 400
    assert idp.userinfo(second["access_token"])[0] == 200
    assert (await _refresh(idp, second["refresh_token"]))[0] == 200
    stats = idp.stats()
    assert stats["spent_refresh_presented"] == 1
    assert stats["reuse_family_revocations"] == 0


async def test_replay_inside_grace_returns_the_same_pair(
    django_idp_factory: DjangoIdPFactory,
) -> None:
    """Inside the grace period DOT answers a replay with the pair it already minted."""
    idp = django_idp_factory(redirect_uris=[REGISTERED], refresh_grace=30)
    first = await _tokens(idp)
    _, second = await _refresh(idp, first["refresh_token"])
    status, replay = await _refresh(idp, first["refresh_token"])
    assert status == 200
    assert replay["access_token"] == second["access_token"]
    assert replay["refresh_token"] == second["refresh_token"]
    assert replay["id_token"] != second["id_token"]  # a fresh ID token each time
    assert idp.userinfo(second["access_token"])[0] == 200
    stats = idp.stats()
    assert stats["spent_refresh_presented"] == 1
    assert stats["in_grace_replays"] == 1
    assert stats["same_pair_returned"] == 1
    assert stats["refresh_ok"] == 2

    _, third = await _refresh(idp, second["refresh_token"])
    # Two generations back the token no longer mints anything: refused even inside grace.
    assert (await _refresh(idp, first["refresh_token"]))[0] == 400
    assert idp.userinfo(third["access_token"])[0] == 401  # ...and reuse protection fired


async def test_denied_consent_redirects_with_access_denied(idp: DjangoIdP) -> None:
    """Cancelling DOT's consent form sends the browser back with error=access_denied."""
    url = authorize_url(
        idp.authorize_endpoint,
        client_id=idp.client_id,
        redirect_uri=REDIRECT,
        scope=SCOPE,
        state="s-deny",
        code_challenge=Pkce.new().challenge,
    )
    result = await login(url, "alice", "alice-password", approve=False)
    assert result.error == "access_denied"
    assert result.state == "s-deny"
    assert result.code is None


async def test_code_exchange_needs_the_right_verifier(idp: DjangoIdP) -> None:
    """Without its code_verifier, or with another, a code is refused."""
    code, _ = await _authorize(idp)
    status, body = await _exchange(idp, code, None)
    assert (status, body["error"]) == (400, "invalid_request")  # "Code verifier required."
    code, _ = await _authorize(idp)
    status, body = await _exchange(idp, code, Pkce.new().verifier)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_authorize_without_code_challenge_is_refused(idp: DjangoIdP) -> None:
    """PKCE_REQUIRED: an authorize request without a challenge comes back invalid_request."""
    url = authorize_url(
        idp.authorize_endpoint,
        client_id=idp.client_id,
        redirect_uri=REDIRECT,
        scope=SCOPE,
        state="s",
        code_challenge=None,
    )
    result = await login(url, "alice", "alice-password")
    assert result.error == "invalid_request"


async def test_revoking_the_access_token_makes_userinfo_reject_it(idp: DjangoIdP) -> None:
    """RFC 7009 revocation at /o/revoke_token/ kills the access token (and its refresh token)."""
    tokens = await _tokens(idp)
    data = {"token": tokens["access_token"], "client_id": idp.client_id}
    status, _ = await _post(idp.revocation_endpoint, data)
    assert status == 200
    assert idp.userinfo(tokens["access_token"])[0] == 401
    assert (await _refresh(idp, tokens["refresh_token"]))[0] == 400


async def test_login_can_follow_the_redirect_to_the_callback(idp: DjangoIdP) -> None:
    """With follow=True the helper GETs the callback and returns its status and body."""
    app = web.Application()

    async def callback(request: web.Request) -> web.Response:
        return web.Response(text=f"got {request.query['state']}", status=201)

    app.router.add_get("/callback", callback)
    async with TestServer(app, host="127.0.0.1") as server:
        redirect_uri = str(server.make_url("/callback"))
        url = authorize_url(
            idp.authorize_endpoint,
            client_id=idp.client_id,
            redirect_uri=redirect_uri,
            scope="openid",
            state="s-follow",
            code_challenge=Pkce.new().challenge,
        )
        result = await login(url, "alice", "alice-password", follow=True)
    assert (result.callback_status, result.callback_body) == (201, "got s-follow")
    assert result.code


async def test_injected_status_fault_skips_dot(idp: DjangoIdP) -> None:
    """An armed token_status fault answers without touching DOT, then the IdP works again."""
    tokens = await _tokens(idp)
    idp.faults(token_status=503, count=1)
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(
            idp.token_endpoint,
            data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        ) as resp,
    ):
        assert resp.status == 503
    assert (await _refresh(idp, tokens["refresh_token"]))[0] == 200
    stats = idp.stats()
    assert stats["injected_faults"] == 1
    assert stats["token_requests"]["refresh_token"] == 2
    assert stats["spent_refresh_presented"] == 0


async def test_injected_delay_gives_an_ambiguous_outcome(idp: DjangoIdP) -> None:
    """A client that times out on a delayed answer did rotate: its token is then spent."""
    tokens = await _tokens(idp)
    idp.faults(token_delay=1.5, count=1)
    with pytest.raises(TimeoutError):
        await _refresh(idp, tokens["refresh_token"], limit=0.3)
    await asyncio.sleep(1.5)  # let the delayed answer finish before replaying
    assert (await _refresh(idp, tokens["refresh_token"]))[0] == 400
    stats = idp.stats()
    assert stats["refresh_ok"] == 1
    assert stats["spent_refresh_presented"] == 1


async def test_runtime_settings_change_the_access_token_lifetime(idp: DjangoIdP) -> None:
    """POST /test/settings changes the lifetime of the next access token."""
    tokens = await _tokens(idp)
    assert idp.settings(access_token_lifetime=60)["access_token_lifetime"] == 60
    _, refreshed = await _refresh(idp, tokens["refresh_token"])
    assert refreshed["expires_in"] == 60


async def test_restart_keeps_port_database_and_key(idp: DjangoIdP) -> None:
    """After stop() the port refuses connections; restart() serves the same grants and keys."""
    tokens = await _tokens(idp)
    _, jwks = await _get(f"{idp.issuer}/.well-known/jwks.json")
    port = idp.port
    idp.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(idp.discovery_url)
    idp.restart()
    assert idp.port == port
    assert (await _get(f"{idp.issuer}/.well-known/jwks.json"))[1] == jwks
    assert idp.userinfo(tokens["access_token"])[0] == 200
    assert (await _refresh(idp, tokens["refresh_token"]))[0] == 200
    assert idp.stats()["token_requests"] == {"refresh_token": 1}  # counters restart


@pytest.mark.slow
async def test_fifty_concurrent_flows_do_not_lock_the_database(idp: DjangoIdP) -> None:
    """Fifty logins, code exchanges and refreshes at once all succeed on SQLite."""
    started = time.monotonic()
    sets = await asyncio.gather(*(_tokens(idp, ("alice", "bob")[i % 2]) for i in range(50)))
    results = await asyncio.gather(*(_refresh(idp, t["refresh_token"]) for t in sets))
    assert [status for status, _ in results] == [200] * 50
    assert idp.stats()["refresh_ok"] == 50
    assert time.monotonic() - started < 60


# -- netID fakes ---------------------------------------------------------------------------------


async def _netid_code(fake: NetIDFake, scope: str, pkce: Pkce) -> str:
    url = authorize_url(
        fake.authorize_endpoint,
        client_id=fake.client_id,
        redirect_uri=REDIRECT,
        scope=scope,
        state="s-n",
        nonce="n-n",
        code_challenge=pkce.challenge,
    )
    result = await login(url, "anyone", "unused")  # auto-consent: no form is shown
    assert result.state == "s-n"
    assert result.code is not None, result.redirect_url
    return result.code


async def _netid_exchange(fake: NetIDFake, code: str, verifier: str) -> tuple[int, Any]:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": fake.client_id,
        "code_verifier": verifier,
    }
    return await _post(fake.token_endpoint, data)


async def _check(fake: NetIDFake, token: str) -> tuple[int, Any]:
    return await _get(fake.check_endpoint, {"Authorization": f"Bearer {token}"})


async def test_netid_sso_carries_the_access_token_in_the_id_token(
    netid_factory: NetIDFactory,
) -> None:
    """scope=openid permission_management: the usable token is the ID token's claim."""
    fake = await netid_factory()
    pkce = Pkce.new()
    code = await _netid_code(fake, SSO_SCOPE, pkce)
    status, body = await _netid_exchange(fake, code, pkce.verifier)
    assert status == 200
    assert set(body) == {"id_token", "scope"}
    _, discovery = await _get(fake.discovery_url)
    _, jwks = await _get(discovery["jwks_uri"])
    claims = _decode(body["id_token"], jwks)
    assert claims["iss"] == discovery["issuer"] == fake.issuer
    assert (claims["aud"], claims["sub"], claims["nonce"]) == (fake.client_id, fake.subject, "n-n")
    grant = claims["permission_management"]
    assert (grant["token_type"], grant["expires_in"]) == ("bearer", 500)
    status, info = await _check(fake, grant["access_token"])
    assert (status, info["scope"], info["sub"]) == (200, TOKEN_ONLY_SCOPE, fake.subject)
    fake.clock_offset = 501
    assert (await _check(fake, grant["access_token"]))[0] == 401


async def test_netid_token_only_flow_returns_a_plain_access_token(
    netid_factory: NetIDFactory,
) -> None:
    """scope=permission_management alone: only access_token, scope, token_type, expires_in."""
    fake = await netid_factory(access_token_lifetime=499)
    pkce = Pkce.new()
    code = await _netid_code(fake, TOKEN_ONLY_SCOPE, pkce)
    status, body = await _netid_exchange(fake, code, pkce.verifier)
    assert status == 200
    assert set(body) == {"access_token", "scope", "token_type", "expires_in"}
    assert (body["scope"], body["token_type"], body["expires_in"]) == (
        TOKEN_ONLY_SCOPE,
        "Bearer",
        499,
    )
    assert (await _check(fake, body["access_token"]))[0] == 200
    assert (await _check(fake, "nid-made-up"))[0] == 401


async def test_netid_sso_userinfo_token_is_not_the_permission_token(
    netid_factory: NetIDFactory,
) -> None:
    """With sso_userinfo_token the top-level access token exists but is scoped to openid only."""
    fake = await netid_factory(sso_userinfo_token=True)
    pkce = Pkce.new()
    code = await _netid_code(fake, SSO_SCOPE, pkce)
    _, body = await _netid_exchange(fake, code, pkce.verifier)
    assert "refresh_token" not in body
    assert (await _check(fake, body["access_token"]))[1]["scope"] == "openid"


async def test_netid_verifies_pkce_and_spends_codes(netid_factory: NetIDFactory) -> None:
    """A wrong verifier is invalid_grant, and a code works once only."""
    fake = await netid_factory()
    pkce = Pkce.new()
    code = await _netid_code(fake, TOKEN_ONLY_SCOPE, pkce)
    assert await _netid_exchange(fake, code, Pkce.new().verifier) == (
        400,
        {"error": "invalid_grant"},
    )
    code = await _netid_code(fake, TOKEN_ONLY_SCOPE, pkce)
    assert (await _netid_exchange(fake, code, pkce.verifier))[0] == 200
    assert (await _netid_exchange(fake, code, pkce.verifier))[0] == 400


async def test_netid_denial_and_bad_scope_redirect_with_errors(netid_factory: NetIDFactory) -> None:
    """approve=False gives access_denied; a scope without permission_management invalid_scope."""
    fake = await netid_factory()
    pkce = Pkce.new()
    for scope, approve, error in [
        (TOKEN_ONLY_SCOPE, False, "access_denied"),
        ("openid profile", True, "invalid_scope"),
    ]:
        fake.approve = approve
        url = authorize_url(
            fake.authorize_endpoint,
            client_id=fake.client_id,
            redirect_uri=REDIRECT,
            scope=scope,
            state="s",
            code_challenge=pkce.challenge,
        )
        result = await login(url, "anyone", "unused")
        assert parse_qs(urlsplit(result.redirect_url).query)["error"] == [error]
