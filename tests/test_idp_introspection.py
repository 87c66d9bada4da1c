"""The test IdP's RFC 7662 introspection answers for refresh tokens, the way rotation needs it.

A refresh token is active until it is rotated or revoked (inside the grace period too), the
public test client asks by its client_id, and a runtime setting makes the IdP refuse it.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import aiohttp
import pytest

from tests import faultproxy
from tests.faultproxy import Fault, ProxiedIdPFactory
from tests.idp import fixture as idp_fixture
from tests.idp.browser import Pkce, authorize_url, login
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory
from tests.rotation_harness import remember_secret

django_idp_factory = idp_fixture.django_idp_factory
proxied_idp_factory = faultproxy.proxied_idp_factory

REGISTERED = "http://127.0.0.1/callback"  # DOT ignores the port of a 127.0.0.1 redirect URI
REDIRECT = "http://127.0.0.1:9/callback"  # nothing listens; the login helper stops before it
SCOPE = "openid profile"
TIMEOUT = aiohttp.ClientTimeout(total=15)


async def _request(method: str, url: str, data: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.request(method, url, data=data, allow_redirects=False) as resp,
    ):
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


async def _tokens(idp: DjangoIdP, user: str = "alice") -> dict[str, Any]:
    """Log in through the real forms and exchange the code; the tokens are remembered."""
    pkce, state = Pkce.new(), secrets.token_urlsafe(8)
    url = authorize_url(
        idp.authorize_endpoint,
        client_id=idp.client_id,
        redirect_uri=REDIRECT,
        scope=SCOPE,
        state=state,
        nonce="n",
        code_challenge=pkce.challenge,
    )
    result = await login(url, user, f"{user}-password")
    assert result.code is not None, result.redirect_url
    status, tokens = await _request(
        "POST",
        idp.token_endpoint,
        {
            "grant_type": "authorization_code",
            "code": result.code,
            "redirect_uri": REDIRECT,
            "client_id": idp.client_id,
            "code_verifier": pkce.verifier,
        },
    )
    assert status == 200, tokens
    _remember(tokens)
    return dict(tokens)


async def _refresh(idp: DjangoIdP, refresh_token: str) -> tuple[int, Any]:
    data = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": "broker-test",
    }
    status, body = await _request("POST", idp.token_endpoint, data)
    if status == 200:
        _remember(body)
    return status, body


def _remember(tokens: dict[str, Any]) -> None:
    for key in ("access_token", "refresh_token", "id_token"):
        if key in tokens:
            remember_secret(tokens[key])


async def _introspect(
    idp: DjangoIdP, token: str, hint: str | None = None, client_id: str | None = "broker-test"
) -> tuple[int, Any]:
    data = {"token": token}
    if hint is not None:
        data["token_type_hint"] = hint
    if client_id is not None:
        data["client_id"] = client_id
    return await _request("POST", idp.introspection_endpoint, data)


@pytest.fixture
def idp(django_idp_factory: DjangoIdPFactory) -> DjangoIdP:
    """One IdP with the defaults: no grace, reuse protection on, introspection allowed."""
    return django_idp_factory(redirect_uris=[REGISTERED])


async def test_a_live_refresh_token_is_active(idp: DjangoIdP) -> None:
    """Before any rotation the refresh token (with either hint) and its access token are active."""
    tokens = await _tokens(idp)
    for hint in ("refresh_token", "access_token", None):
        status, answer = await _introspect(idp, tokens["refresh_token"], hint)
        assert status == 200
        assert answer == {
            "active": True,
            "scope": SCOPE,
            "client_id": "broker-test",
            "username": "alice",
        }
    status, answer = await _introspect(idp, tokens["access_token"], "access_token")
    assert (status, answer["active"], answer["client_id"]) == (200, True, "broker-test")
    assert answer["exp"] > 0
    assert idp.stats()["introspection"] == {
        "requests": 4,
        "active": 4,
        "inactive": 0,
        "refused": 0,
    }


async def test_a_rotated_refresh_token_is_inactive_at_once(idp: DjangoIdP) -> None:
    """With no grace, the refresh token a refresh spent is inactive; its successor is active."""
    first = await _tokens(idp)
    status, second = await _refresh(idp, first["refresh_token"])
    assert status == 200
    assert await _introspect(idp, first["refresh_token"], "refresh_token") == (
        200,
        {"active": False},
    )
    status, answer = await _introspect(idp, second["refresh_token"], "refresh_token")
    assert (status, answer["active"]) == (200, True)
    counts = idp.stats()["introspection"]
    assert (counts["active"], counts["inactive"]) == (1, 1)


async def test_inside_grace_a_rotated_token_is_inactive_yet_replayable(
    django_idp_factory: DjangoIdPFactory,
) -> None:
    """Inside grace a rotated token reads inactive, although DOT still accepts its replay."""
    idp = django_idp_factory(redirect_uris=[REGISTERED], refresh_grace=60)
    first = await _tokens(idp)
    _, second = await _refresh(idp, first["refresh_token"])
    assert (await _introspect(idp, first["refresh_token"]))[1] == {"active": False}
    status, replay = await _refresh(idp, first["refresh_token"])
    assert status == 200
    assert replay["refresh_token"] == second["refresh_token"]
    assert idp.stats()["in_grace_replays"] == 1


async def test_revoked_and_unknown_tokens_are_inactive(idp: DjangoIdP) -> None:
    """A refresh token revoked at /o/revoke_token/ is inactive, and so is a made-up value."""
    tokens = await _tokens(idp)
    data = {"token": tokens["refresh_token"], "client_id": idp.client_id}
    assert (await _request("POST", idp.revocation_endpoint, data))[0] == 200
    assert (await _introspect(idp, tokens["refresh_token"]))[1] == {"active": False}
    made_up = secrets.token_urlsafe(24)
    assert await _introspect(idp, made_up, "refresh_token") == (200, {"active": False})


async def test_the_refused_setting_answers_invalid_client(idp: DjangoIdP) -> None:
    """With introspection off the client gets 401 invalid_client; switched back on, answers."""
    tokens = await _tokens(idp)
    assert idp.settings(introspection=False)["introspection"] is False
    status, answer = await _introspect(idp, tokens["refresh_token"])
    assert (status, answer["error"]) == (401, "invalid_client")
    idp.settings(introspection=True)
    assert (await _introspect(idp, tokens["refresh_token"]))[1]["active"] is True
    counts = idp.stats()["introspection"]
    assert (counts["requests"], counts["refused"], counts["active"]) == (2, 1, 1)


async def test_callers_must_name_a_public_client_and_a_token(idp: DjangoIdP) -> None:
    """No or an unknown client_id is invalid_client; no token is invalid_request; GET is 405."""
    tokens = await _tokens(idp)
    for client_id in (None, "someone-else"):
        status, answer = await _introspect(idp, tokens["refresh_token"], client_id=client_id)
        assert (status, answer["error"]) == (401, "invalid_client")
    status, answer = await _request(
        "POST", idp.introspection_endpoint, {"client_id": "broker-test"}
    )
    assert (status, answer["error"]) == (400, "invalid_request")
    assert (await _request("GET", idp.introspection_endpoint))[0] == 405


async def test_both_discovery_documents_name_the_introspection_endpoint(idp: DjangoIdP) -> None:
    """The OpenID document and both RFC 8414 locations name /o/introspect/."""
    for url in (idp.discovery_url, *idp.metadata_urls):
        status, document = await _request("GET", url)
        assert status == 200, url
        assert document["introspection_endpoint"] == idp.introspection_endpoint, url


async def test_introspection_through_the_proxy(proxied_idp_factory: ProxiedIdPFactory) -> None:
    """Behind the fault proxy introspection answers the same, and proxy faults reach the client."""
    proxy, idp = await proxied_idp_factory(redirect_uris=[REGISTERED])
    assert idp.introspection_endpoint == f"{proxy.url}/o/introspect/"
    tokens = await _tokens(idp)
    assert (await _introspect(idp, tokens["refresh_token"]))[1]["active"] is True
    proxy.arm("introspect", Fault.STATUS, status=503)
    assert (await _introspect(idp, tokens["refresh_token"]))[0] == 503
    assert (await _introspect(idp, tokens["refresh_token"]))[1]["active"] is True
    counts = proxy.counts["introspect"]
    assert (counts.seen, counts.forwarded, counts.faulted) == (3, 2, 1)
    assert idp.stats()["introspection"]["requests"] == 2
