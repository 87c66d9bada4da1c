"""A login whose ID token fails a check ends as failed, names the check, and stores nothing.

The netID fake (`tests.idp.netid`) can only age its tokens (`clock_offset`), which gives an
expired ID token; every other flaw comes from `tests.tinyidp.TinyIdP`, a provider that does the
code flow properly and then issues an ID token with exactly one thing wrong.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
