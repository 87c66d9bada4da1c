"""Logging in at netID-style providers (seed 001): the access token in an ID token claim, or
an access-token-only response, and grants that have no refresh token.

The providers are the real aiohttp fakes of `tests.idp.netid` (PKCE checked, codes single-use,
no refresh tokens); their /check endpoint says whether a token is one they issued, for which
scope. The broker runs in-process with a clock the test moves (`tests.inprocess`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.idp import netid as netid_module
from tests.idp.browser import LoginResult, login
from tests.idp.netid import NetIDFactory, NetIDFake
from tests.inprocess import REGISTERED_REDIRECT, Broker, Login, serving_broker

netid_factory = netid_module.netid_factory

PROVIDER, USER = "netid", "alice"
LIFETIME = 500  # the fakes' access-token lifetime, seconds
TIMEOUT = aiohttp.ClientTimeout(total=15)


def sso(fake: NetIDFake) -> dict[str, object]:
    """The provider entry for netID single sign-on with the token in the ID token."""
    return {
        "issuer": fake.issuer,
        "client_id": fake.client_id,
        "scopes": ["openid", "permission_management"],
        "access_token_from": "id_token_claim:permission_management",
    }


def token_only(fake: NetIDFake) -> dict[str, object]:
    """The provider entry for netID's plain OAuth flow: an access token and nothing else."""
    return {
        "issuer": fake.issuer,
        "client_id": fake.client_id,
        "scopes": ["permission_management"],
        "access_token_from": "token_response",
    }


async def start_fake(factory: NetIDFactory, **options: Any) -> NetIDFake:
    """A fake that admits the broker's callback on any loopback port."""
    return await factory(redirect_uris=[REGISTERED_REDIRECT], **options)


async def check(fake: NetIDFake, token: str) -> tuple[int, dict[str, Any]]:
    """Ask the fake whether it issued `token` and it is still valid."""
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.get(fake.check_endpoint, headers={"Authorization": f"Bearer {token}"}) as reply,
    ):
        return reply.status, dict(await reply.json())


async def log_in(broker: Broker) -> tuple[Login, LoginResult]:
    """Start a login and let the fake (which consents at once) redirect to the callback."""
    started = await broker.start_login(PROVIDER, USER)
    result = await login(started.authorize_url, USER, "unused", follow=True)
    assert result.callback_status == 200, result.callback_body
    assert (await broker.login_status(started.id))["state"] == "complete"
    return started, result


async def test_the_permission_management_claim_is_the_served_access_token(
    tmp_path: Path, log_dir: Path, netid_factory: NetIDFactory
) -> None:
    """With the token in the ID token's permission_management claim, the broker serves exactly
    that token (the fake accepts it) and keeps it out of the grant's claims and views."""
    fake = await start_fake(netid_factory)
    async with serving_broker(tmp_path, log_dir, {PROVIDER: sso(fake)}) as broker:
        started, result = await log_in(broker)
        assert started.param("scope") == "openid permission_management"
        assert started.param("nonce")

        served = (await broker.token(PROVIDER, USER)).json()
        token = served["access_token"]
        assert served["token_type"] == "Bearer"
        assert served["scope"] == "openid permission_management"
        assert LIFETIME - 5 <= served["expires_in"] <= LIFETIME
        status, info = await check(fake, token)
        assert (status, info["sub"], info["scope"]) == (200, fake.subject, "permission_management")

        for path in (f"/v1/grants/{PROVIDER}/{USER}", "/v1/grants"):
            reply = await broker.call("GET", path)
            assert reply.status == 200, reply.text
            assert token not in reply.text
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["state"], grant["generation"]) == (fake.subject, "active", 1)
        assert grant["has_refresh_token"] is False

        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.claims["sub"] == fake.subject
        assert "permission_management" not in stored.claims
        assert token not in json.dumps(stored.claims)
        assert stored.tokens.access_token is not None
        assert stored.tokens.access_token.reveal() == token
        assert stored.tokens.refresh_token is None
        assert token.encode() not in broker.database_bytes()
        assert stored.tokens.id_token is not None
        broker.assert_not_logged(token, stored.tokens.id_token.reveal(), result.code)


async def test_a_top_level_access_token_does_not_replace_the_claims_token(
    tmp_path: Path, log_dir: Path, netid_factory: NetIDFactory
) -> None:
    """When the response also carries an openid-only access token, the broker still serves the
    permission_management token from the ID token."""
    fake = await start_fake(netid_factory, sso_userinfo_token=True)
    async with serving_broker(tmp_path, log_dir, {PROVIDER: sso(fake)}) as broker:
        await log_in(broker)
        token = await broker.access_token(PROVIDER, USER)
        status, info = await check(fake, token)
        assert (status, info["scope"]) == (200, "permission_management")


async def test_an_access_token_only_response_is_stored_and_served(
    tmp_path: Path, log_dir: Path, netid_factory: NetIDFactory
) -> None:
    """scope permission_management alone: no nonce, no ID token, no refresh token; the plain
    access token is stored and served, and the fake accepts it."""
    fake = await start_fake(netid_factory)
    async with serving_broker(tmp_path, log_dir, {PROVIDER: token_only(fake)}) as broker:
        started, result = await log_in(broker)
        assert "nonce" not in started.params
        assert started.param("scope") == "permission_management"

        served = (await broker.token(PROVIDER, USER)).json()
        assert served["scope"] == "permission_management"
        assert LIFETIME - 5 <= served["expires_in"] <= LIFETIME
        status, info = await check(fake, served["access_token"])
        assert (status, info["scope"]) == (200, "permission_management")
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["state"], grant["has_refresh_token"]) == (None, "active", False)
        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.tokens.id_token is None
        assert stored.tokens.refresh_token is None
        # Said once, as information: this provider never issues a refresh token.
        said = [line for line in broker.log().splitlines() if "login_without_refresh_token" in line]
        assert len(said) == 1
        assert '"level": "info"' in said[0]
        broker.assert_not_logged(served["access_token"], result.code)


async def test_a_grant_without_a_refresh_token_needs_a_new_login_once_its_token_expires(
    tmp_path: Path, log_dir: Path, netid_factory: NetIDFactory
) -> None:
    """The token is served until it expires; then GET /v1/tokens is 409 reauth_required and
    GET /v1/grants shows the grant as reauth_required with the reason."""
    fake = await start_fake(netid_factory)
    async with serving_broker(tmp_path, log_dir, {PROVIDER: sso(fake)}) as broker:
        await log_in(broker)
        broker.clock.advance(LIFETIME - 30)
        token = await broker.access_token(PROVIDER, USER)

        broker.clock.advance(60)
        reply = await broker.token(PROVIDER, USER)
        assert reply.status == 409, reply.text
        problem = reply.json()
        assert problem["code"] == "reauth_required"
        assert "refresh token" in problem["detail"]
        assert "log in again" in problem["detail"]

        grant = (await broker.grant(PROVIDER, USER)).json()
        assert grant["state"] == "reauth_required", grant
        assert grant["last_error"]
        assert "refresh token" in grant["last_error"]
        listed = (await broker.call("GET", "/v1/grants")).json()
        assert [(g["user"], g["state"]) for g in listed] == [(USER, "reauth_required")]

        # A new login brings it back.
        await log_in(broker)
        fresh = await broker.access_token(PROVIDER, USER)
        assert fresh != token
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["state"], grant["generation"]) == ("active", 2)


async def test_delete_of_a_grant_at_a_provider_without_revocation_deletes_it(
    tmp_path: Path, log_dir: Path, netid_factory: NetIDFactory
) -> None:
    """netID advertises no revocation endpoint: DELETE removes the grant and says it was not
    revoked at the provider."""
    fake = await start_fake(netid_factory)
    async with serving_broker(tmp_path, log_dir, {PROVIDER: sso(fake)}) as broker:
        await log_in(broker)
        reply = await broker.call("DELETE", f"/v1/grants/{PROVIDER}/{USER}")
        assert reply.status == 200, reply.text
        assert reply.json()["revoked_at_provider"] is False
        assert (await broker.grant(PROVIDER, USER)).status == 404
        assert (await broker.token(PROVIDER, USER)).status == 404
