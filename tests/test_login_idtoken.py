"""A login whose ID token fails a check ends as failed, names the check, and stores nothing.

The netID fake (`tests.idp.netid`) can only age its tokens (`clock_offset`), which gives an
expired ID token; every other flaw comes from `tests.tinyidp.TinyIdP`, a provider that does the
code flow properly and then issues an ID token with exactly one thing wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.model import Secret
from tests import tinyidp
from tests.idp import netid as netid_module
from tests.idp.browser import LoginResult, login
from tests.idp.netid import NetIDFactory
from tests.inprocess import (
    REGISTERED_REDIRECT,
    Broker,
    Login,
    assert_failure_page,
    assert_login_failed,
    serving_broker,
)
from tests.tinyidp import StartTinyIdP, tiny

netid_factory = netid_module.netid_factory
tiny_idp_factory = tinyidp.tiny_idp_factory

PROVIDER, USER = "tiny", "alice"


async def log_in(broker: Broker, provider: str) -> tuple[Login, LoginResult]:
    """Start a login; let the provider (which consents at once) redirect to the callback."""
    started = await broker.start_login(provider, USER)
    return started, await login(started.authorize_url, USER, "unused", follow=True)


async def test_a_flawless_id_token_from_the_tiny_provider_logs_in(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """The control: without a flaw the same provider's login completes (so each failure below
    is the flaw's doing)."""
    idp = await tiny_idp_factory()
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        started, result = await log_in(broker, PROVIDER)
        assert result.callback_status == 200, result.callback_body
        assert (await broker.login_status(started.id))["state"] == "complete"
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["state"]) == ("tiny-sub", "active")
        assert await broker.access_token(PROVIDER, USER) == idp.issued[0]
        broker.assert_not_logged(*idp.issued)
        assert idp.revoked == []  # a login that succeeds keeps its tokens


async def test_a_login_answered_without_a_refresh_token_keeps_the_accounts_own(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """A provider that issues a refresh token only at the first consent answers a second
    login without one: for the same account the grant keeps its refresh token (and its
    schedule); for another account (forced) it holds none, and says so."""
    idp = await tiny_idp_factory()
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        await log_in(broker, PROVIDER)
        first = (await broker.grant(PROVIDER, USER)).json()
        assert first["has_refresh_token"] is True
        idp.refresh_tokens = False
        started, _ = await log_in(broker, PROVIDER)
        assert (await broker.login_status(started.id))["state"] == "complete"
        second = (await broker.grant(PROVIDER, USER)).json()
        assert second["has_refresh_token"] is True
        assert second["next_refresh_at"] is not None
        assert await broker.access_token(PROVIDER, USER) == idp.issued[-3]  # the new one
        assert '"event": "login_kept_refresh_token"' in broker.log()
        idp.sub = "another-account"
        started = await broker.start_login(PROVIDER, USER, force=True)
        await login(started.authorize_url, USER, "unused", follow=True)
        assert (await broker.login_status(started.id))["state"] == "complete"
        third = (await broker.grant(PROVIDER, USER)).json()
        assert (third["sub"], third["has_refresh_token"]) == ("another-account", False)
        dropped = [
            line for line in broker.log().splitlines() if "login_without_refresh_token" in line
        ]
        assert len(dropped) == 1
        assert '"level": "warning"' in dropped[0]
        assert "the refresh token it held is dropped" in dropped[0]
        broker.assert_not_logged(*idp.issued)


async def test_a_refresh_serves_the_claims_token_only_for_the_same_account(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """With the access token in an ID token claim, a refresh serves the refreshed ID token's
    claim token (not kept twice among the claims); a refreshed ID token naming another
    account (OIDC Core 12.2) gets its token refused, while the rotated refresh token is kept."""
    idp = await tiny_idp_factory()
    idp.claim = "permission_management"
    provider = tiny(idp) | {"access_token_from": "id_token_claim:permission_management"}
    refresh = f"/v1/grants/{PROVIDER}/{USER}/refresh"
    async with serving_broker(tmp_path, log_dir, {PROVIDER: provider}) as broker:
        await log_in(broker, PROVIDER)
        assert await broker.access_token(PROVIDER, USER) == idp.issued[0]
        reply = await broker.call("POST", refresh)
        assert (reply.status, reply.json()["last_error"]) == (200, None), reply.text
        refreshed = idp.issued[-3]
        assert await broker.access_token(PROVIDER, USER) == refreshed
        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.claims["sub"] == "tiny-sub"
        assert "permission_management" not in stored.claims

        idp.sub = "another-account"
        reply = await broker.call("POST", refresh)
        assert reply.status == 200, reply.text
        assert (reply.json()["state"], reply.json()["sub"]) == ("active", "tiny-sub")
        assert "names another sub" in reply.json()["last_error"]
        assert await broker.access_token(PROVIDER, USER) == refreshed
        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.tokens.refresh_token == Secret(idp.issued[-2])
        broker.assert_not_logged(*idp.issued)


@pytest.mark.parametrize(
    ("flaw", "reason"),
    [
        ("nonce", "nonce does not match"),
        ("no-nonce", "nonce is missing"),
        ("aud", "aud does not match"),
        ("iss", "iss does not match"),
        ("exp", "exp"),
        ("signature", "signature does not verify"),
        ("alg-none", "unsupported_algorithm"),
    ],
)
async def test_an_id_token_that_fails_a_check_fails_the_login(
    tmp_path: Path,
    log_dir: Path,
    tiny_idp_factory: StartTinyIdP,
    flaw: str,
    reason: str,
) -> None:
    """A wrong nonce, a missing nonce, a foreign aud or iss, an expired token, a bad signature
    or an unsigned token: the login fails naming the check, and nothing is stored."""
    idp = await tiny_idp_factory(flaw=flaw)
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        started, result = await log_in(broker, PROVIDER)
        assert_failure_page(result, reason)
        await assert_login_failed(broker, started, "ID token check failed", reason)
        assert idp.token_requests == 1
        broker.assert_not_logged(*idp.issued)
        # The refresh token the exchange issued was revoked (its access token goes with it).
        _access, refresh, _id_token = idp.issued
        assert idp.revoked == [(refresh, "refresh_token")]


async def test_an_expired_id_token_from_netid_fails_the_login(
    tmp_path: Path, log_dir: Path, netid_factory: NetIDFactory
) -> None:
    """netID's ID token, aged an hour by the fake's clock, fails the exp check: no grant."""
    fake = await netid_factory(redirect_uris=[REGISTERED_REDIRECT])
    fake.clock_offset = -3600
    provider = {
        "issuer": fake.issuer,
        "client_id": fake.client_id,
        "scopes": ["openid", "permission_management"],
        "access_token_from": "id_token_claim:permission_management",
    }
    async with serving_broker(tmp_path, log_dir, {"netid": provider}) as broker:
        started, result = await log_in(broker, "netid")
        assert_failure_page(result, "exp")
        await assert_login_failed(broker, started, "ID token check failed", "exp")
        assert fake.stats["tokens_issued"] == 1
