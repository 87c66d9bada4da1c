"""Logging users in at a real django-oauth-toolkit IdP (seed 000): the flow end to end.

Every test drives the IdP's real login and consent forms with `tests.idp.browser.login` and
lets the browser arrive at the broker's callback listener; the broker is the daemon's own
composition root (`tests.inprocess`), in-process with a clock the test can move, or a real
`serve` subprocess. What a test asserts is what clients and the IdP see: the API's answers,
the callback page, the IdP's userinfo and token endpoints, its /test/stats counters, and the
broker's log file, which must hold no token and no authorization code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import pytest

from broker.login import LOGIN_TTL
from tests import inprocess
from tests.idp import fixture as idp_fixture
from tests.idp.browser import LoginResult, login
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory
from tests.inprocess import (
    REGISTERED_REDIRECT,
    Broker,
    Login,
    assert_failure_page,
    assert_login_failed,
    code_exchanges,
    serving_broker,
    techniek,
)

django_idp_factory = idp_fixture.django_idp_factory
shared_idp = inprocess.shared_idp

PROVIDER, USER = "techniek", "alice"
TIMEOUT = aiohttp.ClientTimeout(total=15)


async def log_in(
    broker: Broker,
    account: str = USER,
    *,
    user: str = USER,
    force: bool = False,
    approve: bool = True,
    follow: bool = True,
) -> tuple[Login, LoginResult]:
    """Start a login for techniek/`user` and sign in at the IdP's forms as `account`."""
    started = await broker.start_login(PROVIDER, user, force=force)
    result = await login(
        started.authorize_url, account, f"{account}-password", approve=approve, follow=follow
    )
    return started, result


async def refresh_at_idp(idp: DjangoIdP, refresh_token: str) -> tuple[int, dict[str, Any]]:
    """Spend a refresh token at the IdP's token endpoint directly, as the broker would."""
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": "broker-test",
    }
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
        session.post(idp.token_endpoint, data=form) as response,
    ):
        return response.status, dict(await response.json(content_type=None))


# -- the flow that works ------------------------------------------------------------------------


async def test_a_login_through_the_real_forms_stores_a_grant_whose_token_the_idp_accepts(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """The real daemon stores alice's grant (her sub, active, generation 1) and serves a token
    that the IdP's userinfo accepts; the login goes pending -> complete."""
    providers = {PROVIDER: techniek(shared_idp)}
    async with serving_broker(tmp_path, log_dir, providers, process=True) as broker:
        started = await broker.start_login(PROVIDER, USER)
        assert (await broker.login_status(started.id))["state"] == "pending"
        assert (await broker.grant(PROVIDER, USER)).status == 404

        result = await login(started.authorize_url, USER, "alice-password", follow=True)
        assert result.callback_status == 200, result.callback_body
        assert "You may close this window" in (result.callback_body or "")

        status = await broker.login_status(started.id)
        assert status == {
            "state": "complete",
            "provider": PROVIDER,
            "user": USER,
            "expires_at": started.expires_at,
        }
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert grant["sub"] == shared_idp.subs[USER]
        assert grant["state"] == "active"
        assert grant["generation"] == 1
        assert grant["scopes"] == ["openid", "profile", "FGO", "FGOWS"]
        assert grant["has_refresh_token"] is True

        token = await broker.access_token(PROVIDER, USER)
        code, claims = shared_idp.userinfo(token)
        assert code == 200, claims
        assert claims["sub"] == shared_idp.subs[USER]

        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.tokens.refresh_token is not None
        assert stored.tokens.id_token is not None
        on_disk = broker.database_bytes()
        for secret in (token, stored.tokens.refresh_token.reveal(), result.code or "-"):
            assert secret.encode() not in on_disk
        broker.assert_not_logged(
            token,
            stored.tokens.refresh_token.reveal(),
            stored.tokens.id_token.reveal(),
            result.code,
        )


async def test_a_second_login_as_the_same_account_replaces_the_tokens_without_force(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Logging alice in again needs no force: same sub, generation 2, a new working token."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        await log_in(broker)
        first = await broker.access_token(PROVIDER, USER)
        started, result = await log_in(broker)
        assert result.callback_status == 200, result.callback_body
        assert (await broker.login_status(started.id))["state"] == "complete"
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["generation"]) == (shared_idp.subs[USER], 2)
        second = await broker.access_token(PROVIDER, USER)
        assert second != first
        assert shared_idp.userinfo(second)[0] == 200
        broker.assert_not_logged(first, second, result.code)


async def test_a_login_as_another_account_is_refused_unless_forced(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """bob signing in for techniek/alice fails (different sub) and leaves alice's grant; with
    force it replaces it: generation 2, bob's sub, bob's token."""
    alice, bob = shared_idp.subs["alice"], shared_idp.subs["bob"]
    assert alice != bob
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        await log_in(broker)
        alice_token = await broker.access_token(PROVIDER, USER)

        refused, result = await log_in(broker, "bob")
        assert_failure_page(result, "different sub")
        status = await broker.login_status(refused.id)
        assert status["state"] == "failed"
        assert "different sub" in status["error"]
        assert "force" in status["error"]
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["generation"], grant["state"]) == (alice, 1, "active")
        assert await broker.access_token(PROVIDER, USER) == alice_token

        forced, result = await log_in(broker, "bob", force=True)
        assert result.callback_status == 200, result.callback_body
        assert (await broker.login_status(forced.id))["state"] == "complete"
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["generation"], grant["state"]) == (bob, 2, "active")
        bob_token = await broker.access_token(PROVIDER, USER)
        code, claims = shared_idp.userinfo(bob_token)
        assert (code, claims.get("sub")) == (200, bob)
        broker.assert_not_logged(alice_token, bob_token, result.code)


# -- every way a login can fail -----------------------------------------------------------------


async def test_a_made_up_state_is_refused_and_changes_no_login(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP, new_secret: Callable[[str], str]
) -> None:
    """A redirect whose state no login issued gets a page saying so; no login changes, no code
    is exchanged."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        started = await broker.start_login(PROVIDER, USER)
        before = code_exchanges(shared_idp)
        query = urlencode({"code": new_secret("code"), "state": new_secret("state")})
        reply = await broker.callback(f"{broker.redirect_uri}?{query}")
        assert_failure_page(reply, "Unknown login state")
        reply = await broker.callback(broker.redirect_uri)
        assert_failure_page(reply, "no state")
        assert (await broker.login_status(started.id))["state"] == "pending"
        assert code_exchanges(shared_idp) == before
        assert (await broker.grant(PROVIDER, USER)).status == 404
        # The login it did not touch still completes.
        result = await login(started.authorize_url, USER, "alice-password", follow=True)
        assert result.callback_status == 200, result.callback_body


async def test_replaying_the_callback_url_fails_and_keeps_the_first_grant(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """The exact redirect URL a second time is refused as used; the grant from the first stays
    and the IdP saw one code exchange."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        before = code_exchanges(shared_idp)
        started, result = await log_in(broker)
        assert result.callback_status == 200, result.callback_body
        token = await broker.access_token(PROVIDER, USER)

        replay = await broker.callback(result.redirect_url)
        assert_failure_page(replay, "already used")
        assert code_exchanges(shared_idp) == before + 1
        assert (await broker.login_status(started.id))["state"] == "complete"
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["state"], grant["generation"]) == ("active", 1)
        assert await broker.access_token(PROVIDER, USER) == token
        broker.assert_not_logged(token, result.code)


async def test_two_simultaneous_arrivals_of_one_redirect_exchange_the_code_once(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """A redirect that arrives twice at once (a double reload) completes once and fails once;
    the IdP sees a single code exchange."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        before = code_exchanges(shared_idp)
        started, result = await log_in(broker, follow=False)
        replies = await asyncio.gather(*(broker.callback(result.redirect_url) for _ in range(2)))
        assert sorted(reply.status for reply in replies) == [200, 400]
        assert code_exchanges(shared_idp) == before + 1
        assert (await broker.login_status(started.id))["state"] == "complete"
        assert (await broker.grant(PROVIDER, USER)).json()["generation"] == 1


async def test_a_denied_consent_fails_the_login_with_access_denied(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Cancel on the consent page brings error=access_denied back: failed, nothing stored."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        before = code_exchanges(shared_idp)
        started, result = await log_in(broker, approve=False)
        assert result.error == "access_denied"
        assert_failure_page(result, "access_denied")
        await assert_login_failed(broker, started, "access_denied")
        assert code_exchanges(shared_idp) == before


async def test_an_error_description_from_the_redirect_is_shown_escaped_and_bounded(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """An IdP error redirect's error_description reaches the page HTML-escaped and cut short,
    and the login's error names the OAuth error."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        started = await broker.start_login(PROVIDER, USER)
        description = "<script>alert(1)</script>" + "x" * 1000
        query = urlencode(
            {
                "error": "temporarily_unavailable",
                "error_description": description,
                "state": started.param("state"),
            }
        )
        reply = await broker.callback(f"{broker.redirect_uri}?{query}")
        assert_failure_page(reply, "temporarily_unavailable", "&lt;script&gt;")
        assert "<script>" not in reply.text
        assert "x" * 300 not in reply.text
        assert reply.headers["Cache-Control"] == "no-store"
        error = await assert_login_failed(broker, started, "temporarily_unavailable")
        assert len(error) < 400


async def test_an_iss_naming_another_issuer_fails_the_login_before_the_code_is_spent(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """A redirect whose iss names another issuer (RFC 9207 mix-up) fails the login, and the
    code is never sent to the token endpoint."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        before = code_exchanges(shared_idp)
        started, result = await log_in(broker, follow=False)
        assert result.code is not None
        evil = urlencode({"iss": "https://attacker.example/o"})
        reply = await broker.callback(f"{result.redirect_url}&{evil}")
        assert_failure_page(reply, "iss")
        await assert_login_failed(broker, started, "iss", "issuer")
        assert code_exchanges(shared_idp) == before
        broker.assert_not_logged(result.code)


async def test_a_login_past_its_expiry_fails_and_spends_no_code(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Once the login's lifetime has passed, it reads as failed (expired) and a late redirect is
    refused without exchanging its code."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        before = code_exchanges(shared_idp)
        started, result = await log_in(broker, follow=False)
        broker.clock.advance(LOGIN_TTL.total_seconds() - 5)
        assert (await broker.login_status(started.id))["state"] == "pending"
        broker.clock.advance(10)
        await assert_login_failed(broker, started, "expired")
        reply = await broker.callback(result.redirect_url)
        assert_failure_page(reply, "expired")
        await assert_login_failed(broker, started, "expired")
        assert code_exchanges(shared_idp) == before


async def test_a_login_whose_provider_left_the_config_fails_when_its_redirect_arrives(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """A login started before a restart that dropped its provider fails with that reason when
    the redirect arrives (no 500 page, no login left pending)."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as first:
        started, result = await log_in(first, follow=False)
    async with serving_broker(tmp_path, log_dir, {"renamed": techniek(shared_idp)}) as second:
        moved = urlsplit(result.redirect_url)._replace(netloc=f"127.0.0.1:{second.callback_port}")
        reply = await second.callback(urlunsplit(moved))
        assert_failure_page(reply, "no longer configured")
        await assert_login_failed(second, started, PROVIDER, "no longer configured")


@pytest.mark.parametrize(
    ("fault", "reasons"),
    [
        pytest.param(
            {
                "token_status": 400,
                "body": '{"error": "invalid_grant", "error_description": "code has expired"}',
            },
            ("invalid_grant", "code has expired"),
            id="oauth-error",
        ),
        pytest.param({"token_status": 503}, ("503",), id="server-error"),
        pytest.param(None, ("cannot connect",), id="idp-stopped"),
    ],
)
async def test_a_failed_code_exchange_fails_the_login_and_stores_nothing(
    tmp_path: Path,
    log_dir: Path,
    django_idp_factory: DjangoIdPFactory,
    fault: dict[str, object] | None,
    reasons: tuple[str, ...],
) -> None:
    """When the token endpoint refuses, breaks, or is gone, the login fails naming why."""
    idp = django_idp_factory(redirect_uris=[REGISTERED_REDIRECT])
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(idp)}) as broker:
        started, result = await log_in(broker, follow=False)
        if fault is None:
            idp.stop()
        else:
            idp.faults(count=1, **fault)
        reply = await broker.callback(result.redirect_url)
        assert_failure_page(reply, *reasons)
        await assert_login_failed(broker, started, *reasons)
        assert result.code is not None
        broker.assert_not_logged(result.code)


# -- revocation --------------------------------------------------------------------------------


async def test_delete_revokes_the_grant_at_the_idp_and_removes_it(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """DELETE answers 200 revoked_at_provider; the IdP then refuses the refresh token
    (invalid_grant) and the access token (userinfo 401), and the grant is gone."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(shared_idp)}) as broker:
        _, result = await log_in(broker)
        token = await broker.access_token(PROVIDER, USER)
        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.tokens.refresh_token is not None
        refresh_token = stored.tokens.refresh_token.reveal()

        reply = await broker.call("DELETE", f"/v1/grants/{PROVIDER}/{USER}")
        assert reply.status == 200, reply.text
        assert reply.json() == {
            "provider": PROVIDER,
            "user": USER,
            "state": "revoked",
            "revoked_at_provider": True,
        }
        assert (await broker.grant(PROVIDER, USER)).status == 404
        assert (await broker.token(PROVIDER, USER)).status == 404
        status, body = await refresh_at_idp(shared_idp, refresh_token)
        assert (status, body.get("error")) == (400, "invalid_grant")
        assert shared_idp.userinfo(token)[0] == 401
        broker.assert_not_logged(token, refresh_token, result.code)


async def test_delete_while_the_idp_is_down_is_503_and_keeps_the_grant(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """With the IdP unreachable, DELETE is 503 token_unavailable (Retry-After) and the grant
    stays, still served; once the IdP is back, DELETE revokes it."""
    idp = django_idp_factory(redirect_uris=[REGISTERED_REDIRECT])
    async with serving_broker(tmp_path, log_dir, {PROVIDER: techniek(idp)}) as broker:
        await log_in(broker)
        token = await broker.access_token(PROVIDER, USER)
        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.tokens.refresh_token is not None

        idp.stop()
        reply = await broker.call("DELETE", f"/v1/grants/{PROVIDER}/{USER}")
        assert reply.status == 503, reply.text
        assert reply.headers["Content-Type"].startswith("application/problem+json")
        assert reply.json()["code"] == "token_unavailable"
        assert int(reply.headers["Retry-After"]) > 0
        assert "kept" in reply.json()["detail"]
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["state"], grant["generation"]) == ("active", 1)
        assert await broker.access_token(PROVIDER, USER) == token

        idp.restart()
        reply = await broker.call("DELETE", f"/v1/grants/{PROVIDER}/{USER}")
        assert reply.status == 200, reply.text
        assert reply.json()["revoked_at_provider"] is True
        assert (await broker.grant(PROVIDER, USER)).status == 404
        status, body = await refresh_at_idp(idp, stored.tokens.refresh_token.reveal())
        assert (status, body.get("error")) == (400, "invalid_grant")
        assert idp.userinfo(token)[0] == 401
        broker.assert_not_logged(token, stored.tokens.refresh_token.reveal())
