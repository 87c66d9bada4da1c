"""Device logins (RFC 8628) at a real django-oauth-toolkit IdP: the daemon polls, a person
enters the code on DOT's own device page.

The broker is the daemon's composition root in-process (`tests.inprocess`), or a real `serve`
subprocess; the person is `tests.idp.browser.enter_user_code`, which signs in at DOT's device
page, types the user code and presses Accept or Deny. The IdP's client "broker-device" is
allowed the device grant; "broker-test" (the code flow's) is not. DOT issues no ID token in this
grant, so the broker learns the account's `sub` from the userinfo endpoint. What a test asserts
is what clients, the IdP and a person see: the API's answers, DOT's pages and counters, its
userinfo endpoint, and the broker's log, which must hold no token, device code or user code.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from broker.crypto import load_keyring
from broker.store.engine import create_engine
from broker.store.tables import logins
from tests import conftest, inprocess
from tests.idp import fixture as idp_fixture
from tests.idp.browser import LoginError, enter_user_code
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory
from tests.inprocess import Broker, serving_broker, techniek

django_idp_factory = idp_fixture.django_idp_factory
shared_idp = inprocess.shared_idp

PROVIDER, USER = "techniek", "alice"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
END_TIMEOUT = 30.0  # seconds for a login to end once its outcome is decided at the IdP
DEVICE_FIELDS = {"login_id", "verification_uri", "verification_uri_complete", "user_code"}


def device_provider(idp: DjangoIdP, **overrides: object) -> dict[str, object]:
    """The techniek provider with the IdP's device-grant client."""
    return techniek(idp, client_id=idp.device_client_id, **overrides)


@dataclass(frozen=True, slots=True)
class DeviceLogin:
    """What POST /v1/logins answered for a device login."""

    status: int
    id: str
    verification_uri: str
    verification_uri_complete: str | None
    user_code: str
    expires_at: str


async def start_device(
    broker: Broker, user: str = USER, *, force: bool = False, method: str | None = "device"
) -> DeviceLogin:
    """POST /v1/logins for a device login; the user code joins the session's leak scan."""
    body: dict[str, Any] = {"provider": PROVIDER, "user": user, "force": force}
    if method is not None:
        body["method"] = method
    reply = await broker.call("POST", "/v1/logins", body)
    assert reply.status == 201, reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    data = reply.json()
    assert set(data) == DEVICE_FIELDS | {"expires_at"}, data
    conftest.SECRETS.add(data["user_code"])
    return DeviceLogin(
        reply.status,
        data["login_id"],
        data["verification_uri"],
        data["verification_uri_complete"],
        data["user_code"],
        data["expires_at"],
    )


async def sealed_device(broker: Broker, login_id: str) -> dict[str, Any] | None:
    """The device authorization answer sealed in the login's row; None once it has ended.

    Its device code joins the session's leak scan.
    """
    engine = create_engine(broker.store_url)
    try:
        async with engine.connect() as conn:
            query = select(logins.c.device).where(logins.c.id == login_id)
            sealed = (await conn.execute(query)).scalar_one()
    finally:
        await engine.dispose()
    if sealed is None:
        return None
    opened = load_keyring(broker.key_file).open(
        sealed, table="logins", row_id=login_id, column="device"
    )
    answer: dict[str, Any] = json.loads(opened)
    conftest.SECRETS.add(answer["device_code"])
    return answer


async def ended(broker: Broker, login_id: str, within: float = END_TIMEOUT) -> dict[str, Any]:
    """The login's status once it is no longer pending (fails the test after `within` s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = await broker.login_status(login_id)
        if status["state"] != "pending":
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"login {login_id} still pending after {within}s:\n{broker.log()}")


def device_polls(idp: DjangoIdP) -> int:
    """How many device-code polls DOT's token endpoint has answered."""
    return int(idp.stats()["token_requests"].get(DEVICE_GRANT, 0))


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


# -- the flow that works ------------------------------------------------------------------------


async def test_a_device_login_approved_on_the_real_device_page_stores_a_grant_the_idp_accepts(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """201 names DOT's device page and a code; the login is pending until alice enters the code
    and accepts; then the grant holds her sub (from userinfo), and its token works."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        polls_before = device_polls(shared_idp)
        started = await start_device(broker)
        assert started.status == 201
        assert started.verification_uri == shared_idp.device_page
        assert started.verification_uri_complete == (
            f"{shared_idp.device_page}?user_code={started.user_code}"
        )
        assert abs(epoch(started.expires_at) - (time.time() + 600)) < 30
        sealed = await sealed_device(broker, started.id)
        assert sealed is not None
        assert sealed["user_code"] == started.user_code
        assert (await broker.login_status(started.id))["state"] == "pending"
        assert (await broker.grant(PROVIDER, USER)).status == 404

        page = await enter_user_code(
            started.verification_uri, USER, "alice-password", user_code=started.user_code
        )
        assert page.heading == "Device Authorized"
        status = await ended(broker, started.id)
        assert status == {
            "state": "complete",
            "provider": PROVIDER,
            "user": USER,
            "expires_at": started.expires_at,
        }
        assert device_polls(shared_idp) > polls_before

        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["state"], grant["generation"]) == (
            shared_idp.subs[USER],
            "active",
            1,
        )
        assert grant["scopes"] == ["openid", "profile", "FGO", "FGOWS"]
        assert grant["has_refresh_token"] is True
        token = await broker.access_token(PROVIDER, USER)
        code, claims = shared_idp.userinfo(token)
        assert (code, claims.get("sub")) == (200, shared_idp.subs[USER])

        assert await sealed_device(broker, started.id) is None  # erased once ended
        stored = await broker.stored_grant(PROVIDER, USER)
        assert stored is not None
        assert stored.tokens.refresh_token is not None
        broker.assert_not_logged(
            token,
            stored.tokens.refresh_token.reveal(),
            sealed["device_code"],
            started.user_code,
        )


async def test_the_complete_uri_carries_the_code_so_the_person_only_accepts(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Opening verification_uri_complete (what the QR code holds) pre-fills the code on DOT's
    page: signing in and accepting is enough."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        started = await start_device(broker)
        assert started.verification_uri_complete is not None
        page = await enter_user_code(started.verification_uri_complete, USER, "alice-password")
        assert page.heading == "Device Authorized"
        assert (await ended(broker, started.id))["state"] == "complete"
        assert (await broker.grant(PROVIDER, USER)).json()["sub"] == shared_idp.subs[USER]


async def test_a_denied_device_login_fails_with_access_denied_and_stores_nothing(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Deny on DOT's page: the login fails saying the person denied it; no grant exists, and the
    sealed device code is erased."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        started = await start_device(broker)
        await sealed_device(broker, started.id)
        page = await enter_user_code(
            started.verification_uri,
            USER,
            "alice-password",
            user_code=started.user_code,
            approve=False,
        )
        assert page.heading == "Device Denied"
        status = await ended(broker, started.id)
        assert status["state"] == "failed"
        assert "denied the login (access_denied)" in status["error"]
        assert (await broker.grant(PROVIDER, USER)).status == 404
        assert await sealed_device(broker, started.id) is None


async def test_a_device_code_nobody_enters_expires_the_login_and_dot_refuses_it_afterwards(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """With codes living 3 s at DOT, the login fails as expired soon after; polling stops; the
    person who types the code late is told by DOT's page that it expired."""
    idp = django_idp_factory(redirect_uris=[inprocess.REGISTERED_REDIRECT])
    idp.settings(device_expires_in=3)
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(idp)}) as broker:
        started = await start_device(broker)
        assert abs(epoch(started.expires_at) - (time.time() + 3)) < 2
        status = await ended(broker, started.id, within=10)
        assert status["state"] == "failed"
        assert "expired before anyone entered it" in status["error"]
        polls = device_polls(idp)
        assert 1 <= polls <= 4  # once a second for three seconds
        await asyncio.sleep(2.5)
        assert device_polls(idp) == polls
        with pytest.raises(LoginError, match="Expired user code"):
            await enter_user_code(
                started.verification_uri, USER, "alice-password", user_code=started.user_code
            )
        assert (await broker.grant(PROVIDER, USER)).status == 404


async def test_a_client_not_allowed_the_device_grant_fails_with_unauthorized_client(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """The code flow's client gets codes from DOT, but once approved the token endpoint says
    unauthorized_client: the login fails saying what to change, and stores nothing."""
    providers = {PROVIDER: techniek(shared_idp)}  # client_id broker-test: code flow only
    async with serving_broker(tmp_path, log_dir, providers) as broker:
        started = await start_device(broker)
        await enter_user_code(
            started.verification_uri, USER, "alice-password", user_code=started.user_code
        )
        status = await ended(broker, started.id)
        assert status["state"] == "failed"
        assert (
            "does not allow client broker-test the device grant (unauthorized_client)"
            in (status["error"])
        )
        assert "without --device" in status["error"]
        assert (await broker.grant(PROVIDER, USER)).status == 404


# -- one poller per grant ------------------------------------------------------------------------


async def test_a_second_device_login_while_one_is_pending_joins_it(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """The second POST answers 201 with the same login and code (DOT issued no second code);
    entering that code completes the one login; after it, a third POST starts a new one."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        first = await start_device(broker)
        second = await start_device(broker)
        assert first.status == 201
        assert second.status == 201
        assert (second.id, second.user_code, second.expires_at) == (
            first.id,
            first.user_code,
            first.expires_at,
        )
        await enter_user_code(
            second.verification_uri, USER, "alice-password", user_code=second.user_code
        )
        assert (await ended(broker, first.id))["state"] == "complete"
        third = await start_device(broker)
        assert third.status == 201
        assert (third.id, third.user_code) != (first.id, first.user_code)
        assert broker.log().count('"event": "login_joined"') == 1


async def test_a_second_device_login_asking_for_force_lends_it_to_the_pending_one(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """techniek/alice is alice's; bob approving a device login for it fails (another sub), but
    when a second request with force joins the pending login, bob's approval replaces it."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        mine = await start_device(broker)
        await enter_user_code(
            mine.verification_uri, USER, "alice-password", user_code=mine.user_code
        )
        assert (await ended(broker, mine.id))["state"] == "complete"

        refused = await start_device(broker)
        await enter_user_code(
            refused.verification_uri, "bob", "bob-password", user_code=refused.user_code
        )
        status = await ended(broker, refused.id)
        assert status["state"] == "failed"
        assert "belongs to another account" in status["error"]
        assert (await broker.grant(PROVIDER, USER)).json()["sub"] == shared_idp.subs[USER]

        pending = await start_device(broker)
        forced = await start_device(broker, force=True)
        assert (forced.status, forced.id) == (201, pending.id)
        await enter_user_code(
            pending.verification_uri, "bob", "bob-password", user_code=pending.user_code
        )
        assert (await ended(broker, pending.id))["state"] == "complete"
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["generation"]) == (shared_idp.subs["bob"], 2)


# -- choosing the grant, and the daemon's lifecycle ---------------------------------------------


async def test_without_a_callback_listener_a_login_uses_the_device_grant(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """server.callback = "": a login that names no method is a device login (DOT offers the
    endpoint); one that asks for "code" still gets an authorize URL."""
    providers = {PROVIDER: device_provider(shared_idp)}
    async with serving_broker(tmp_path, log_dir, providers, callback=False) as broker:
        chosen = await start_device(broker, method=None)
        assert chosen.status == 201
        assert chosen.verification_uri == shared_idp.device_page
        reply = await broker.call(
            "POST", "/v1/logins", {"provider": PROVIDER, "user": "carol", "method": "code"}
        )
        assert reply.status == 201, reply.text
        assert reply.json()["authorize_url"].startswith(shared_idp.authorize_endpoint)


async def test_with_a_callback_listener_a_login_that_names_no_method_is_the_code_flow(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """The control: the same provider behind a callback listener gets an authorize URL."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        reply = await broker.call("POST", "/v1/logins", {"provider": PROVIDER, "user": USER})
        assert reply.status == 201, reply.text
        assert set(reply.json()) == {"login_id", "authorize_url", "expires_at"}


async def test_an_unknown_method_is_a_bad_request(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """A method of "password" is refused with 400 naming the methods there are."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        reply = await broker.call(
            "POST", "/v1/logins", {"provider": PROVIDER, "user": USER, "method": "password"}
        )
        assert reply.status == 400
        assert "code, device" in reply.json()["detail"]


async def test_stopping_the_daemon_ends_a_pending_device_login_and_its_polling(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """A device login pending at shutdown reads as failed ("the broker stopped") from the store
    afterwards, and DOT sees no more polls once the daemon is gone."""
    providers = {PROVIDER: device_provider(shared_idp)}
    async with serving_broker(tmp_path, log_dir, providers) as broker:
        started = await start_device(broker)
        await asyncio.sleep(1.5)  # a poll or so
    polls = device_polls(shared_idp)
    await asyncio.sleep(2.5)
    assert device_polls(shared_idp) == polls
    async with serving_broker(tmp_path, log_dir, providers) as again:
        status = await again.login_status(started.id)
        assert status["state"] == "failed"
        assert "the broker stopped before the login completed" in status["error"]
        assert await sealed_device(again, started.id) is None


# -- served like any other grant ----------------------------------------------------------------


@pytest.mark.slow
async def test_a_device_login_grant_rotates_over_several_lifetimes_like_any_other(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """A real `serve` with 6-second tokens at DOT: after a device login it refreshes the grant
    at least four times in 20 s, every token it serves is accepted by DOT's userinfo, and DOT
    never sees a spent refresh token or a failed refresh."""
    idp = django_idp_factory(redirect_uris=[inprocess.REGISTERED_REDIRECT], access_token_lifetime=6)
    refresh = {"lifetime_fraction": 0.5, "min_margin": "1s", "jitter": 0.1}
    providers = {PROVIDER: device_provider(idp)}
    async with serving_broker(
        tmp_path, log_dir, providers, process=True, refresh=refresh
    ) as broker:
        started = await start_device(broker)
        await enter_user_code(
            started.verification_uri, USER, "alice-password", user_code=started.user_code
        )
        assert (await ended(broker, started.id))["state"] == "complete"
        before = idp.stats()
        served: list[str] = []
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as userinfo:
            while time.monotonic() < deadline:
                token = await broker.access_token(PROVIDER, USER)
                conftest.SECRETS.add(token)
                if not served or served[-1] != token:
                    served.append(token)
                    async with userinfo.get(
                        idp.userinfo_endpoint, headers={"Authorization": f"Bearer {token}"}
                    ) as reply:
                        assert reply.status == 200, await reply.text()
                        assert (await reply.json())["sub"] == idp.subs[USER]
                await asyncio.sleep(0.25)
        after = idp.stats()
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert len(served) >= 5, len(served)
        assert grant["generation"] >= 5
        assert after["refresh_ok"] - before["refresh_ok"] >= 4
        assert after["refresh_failed"] == {}
        assert after["spent_refresh_presented"] == 0
        assert grant["state"] == "active"
        broker.assert_not_logged(*served)
