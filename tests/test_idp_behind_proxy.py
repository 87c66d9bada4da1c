"""The test IdP behind the fault proxy: every URL it publishes, and every call, goes through it.

The proxy starts first, the IdP's issuer is pinned to the proxy's origin, and the proxy then
forwards to the IdP. Its discovery documents name the proxy for every endpoint, a login
through the headless browser and a refresh work through it, and a real broker configured with
that issuer reaches the IdP only through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import aiohttp
from joserfc import jwt
from joserfc.jwk import KeySet

from tests import faultproxy
from tests.faultproxy import FaultProxy, ProxiedIdPFactory
from tests.idp import fixture as idp_fixture
from tests.idp.browser import Pkce, authorize_url, login
from tests.idp.fixture import DjangoIdP
from tests.rotation_harness import (
    PROVIDER,
    REGISTERED_REDIRECT,
    RefreshSettings,
    installation,
    remember_secret,
)

django_idp_factory = idp_fixture.django_idp_factory
proxied_idp_factory = faultproxy.proxied_idp_factory

REDIRECT = "http://127.0.0.1:9/oauth-callback/"  # nothing listens; the login helper stops first
TIMEOUT = aiohttp.ClientTimeout(total=15)
URL_KEYS = ("_endpoint", "jwks_uri")


async def _request(method: str, url: str, data: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.request(method, url, data=data, allow_redirects=False) as resp,
    ):
        return resp.status, json.loads(await resp.read())


async def test_discovery_names_the_proxy_for_every_endpoint(
    proxied_idp_factory: ProxiedIdPFactory,
) -> None:
    """OpenID and both RFC 8414 documents, through the proxy, name proxy URLs only."""
    proxy, idp = await proxied_idp_factory(redirect_uris=[REGISTERED_REDIRECT])
    assert idp.issuer == f"{proxy.url}/o"
    for url in (idp.discovery_url, *idp.metadata_urls):
        assert url.startswith(proxy.url)
        status, document = await _request("GET", url)
        assert status == 200, url
        assert document["issuer"] == idp.issuer
        urls = {k: v for k, v in document.items() if k.endswith(URL_KEYS)}
        assert {"token_endpoint", "jwks_uri", "introspection_endpoint"} <= set(urls), url
        assert all(v.startswith(f"{proxy.url}/o/") for v in urls.values()), urls
    assert proxy.counts["discovery"].forwarded == 3


async def test_login_and_refresh_work_through_the_proxy(
    proxied_idp_factory: ProxiedIdPFactory,
) -> None:
    """A browser login, code exchange, JWKS check of the ID token and a refresh all pass through."""
    proxy, idp = await proxied_idp_factory(redirect_uris=[REGISTERED_REDIRECT])
    pkce, state = Pkce.new(), secrets.token_urlsafe(8)
    url = authorize_url(
        idp.authorize_endpoint,
        client_id=idp.client_id,
        redirect_uri=REDIRECT,
        scope="openid profile",
        state=state,
        nonce="n-1",
        code_challenge=pkce.challenge,
    )
    result = await login(url, "alice", "alice-password")
    assert (result.state, result.error) == (state, None)
    assert result.code is not None
    exchange = {
        "grant_type": "authorization_code",
        "code": result.code,
        "redirect_uri": REDIRECT,
        "client_id": idp.client_id,
        "code_verifier": pkce.verifier,
    }
    status, tokens = await _request("POST", idp.token_endpoint, exchange)
    assert status == 200, tokens
    _remember(tokens)
    _, jwks = await _request("GET", idp.jwks_uri)
    claims = jwt.decode(tokens["id_token"], KeySet.import_key_set(jwks), algorithms=["RS256"])
    assert claims.claims["iss"] == idp.issuer == f"{proxy.url}/o"
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    status, refreshed = await _request(
        "POST", idp.token_endpoint, refresh | {"client_id": "broker-test"}
    )
    assert status == 200, refreshed
    _remember(refreshed)
    assert proxy.counts["token"].forwarded == 2
    assert proxy.counts["jwks"].forwarded == 1
    assert proxy.counts["other"].forwarded >= 3  # authorize, the login form, consent
    assert idp.stats()["token_requests"] == {"authorization_code": 1, "refresh_token": 1}


async def test_a_broker_reaches_the_idp_only_through_the_proxy(
    proxied_idp_factory: ProxiedIdPFactory, log_dir: Path
) -> None:
    """A broker configured with the proxied issuer logs in, refreshes and revokes via the proxy."""
    proxy, idp = await proxied_idp_factory(redirect_uris=[REGISTERED_REDIRECT])
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("proxied", refresh=RefreshSettings())
        # The proxy serves on this loop: wait for the daemon from a thread, not on the loop.
        await asyncio.to_thread(broker.start)
        await broker.log_in("alice", "alice-password")
        assert (await broker.refresh("alice")).status == 200
        assert (await broker.call("DELETE", f"/v1/grants/{PROVIDER}/alice")).status == 200
        await broker.close()
    _check_all_went_through(proxy, idp)


def _check_all_went_through(proxy: FaultProxy, idp: DjangoIdP) -> None:
    counts = proxy.counts
    assert counts["discovery"].forwarded >= 1
    assert counts["jwks"].forwarded >= 1
    assert counts["revoke"].forwarded >= 1
    stats = idp.stats()
    assert stats["token_requests"] == {"authorization_code": 1, "refresh_token": 1}
    assert counts["token"].forwarded == sum(stats["token_requests"].values())


def _remember(tokens: dict[str, Any]) -> None:
    for key in ("access_token", "refresh_token", "id_token"):
        if key in tokens:
            remember_secret(tokens[key])
