"""Device logins (RFC 8628) against what django-oauth-toolkit never does: slow_down,
expired_token from the token endpoint, an ID token in this grant, no device endpoint at all, a
device endpoint that refuses the client.

The provider is `tests.tinyidp.TinyIdP` on aiohttp's real test server: its token endpoint
answers device-code polls from a script (`device_answers`) and records when each poll came
(`device_polls`), then issues tokens with an RS256 ID token (no nonce: the grant has none). The
broker is the daemon's own composition root, in-process (`tests.inprocess`).
"""

from __future__ import annotations

from pathlib import Path

from tests import tinyidp
from tests.inprocess import serving_broker
from tests.test_login_device import PROVIDER, USER, ended, start_device
from tests.tinyidp import StartTinyIdP, tiny

tiny_idp_factory = tinyidp.tiny_idp_factory

SLOW_DOWN_STEP = 5.0
TOLERANCE = 0.3  # seconds of scheduling slack a poll may come early by


async def test_slow_down_makes_the_daemon_wait_five_seconds_more(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """With a 1 s interval, the poll after slow_down comes at least 6 s later; the one before it
    came 1 s after the one before; the login then completes with the provider's ID token."""
    idp = await tiny_idp_factory()
    idp.device_answers = ["authorization_pending", "slow_down"]
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        started = await start_device(broker)
        status = await ended(broker, started.id, within=20)
        assert status["state"] == "complete", status
        first, second, third = idp.device_polls
        assert 1 - TOLERANCE <= second - first < 4
        assert third - second >= 1 + SLOW_DOWN_STEP - TOLERANCE
        assert '"event": "device_login_waiting"' in broker.log()
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["state"]) == ("tiny-sub", "active")
        assert await broker.access_token(PROVIDER, USER) == idp.issued[0]
        broker.assert_not_logged(*idp.issued, *idp.device_codes, started.user_code)


async def test_expired_token_from_the_provider_ends_the_login_saying_the_code_expired(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """The token endpoint's expired_token fails the login at once with a reason to start
    again; nothing is stored and there is no further poll."""
    idp = await tiny_idp_factory()
    idp.device_answers = ["expired_token", "authorization_pending"]
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        started = await start_device(broker)
        status = await ended(broker, started.id, within=10)
        assert status["state"] == "failed"
        assert "the code expired before anyone entered it: start a new login" in status["error"]
        assert len(idp.device_polls) == 1
        assert (await broker.grant(PROVIDER, USER)).status == 404


async def test_an_id_token_that_fails_a_check_fails_the_device_login_and_is_revoked(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """An ID token for another client fails the login (aud), as in the code flow; nothing is
    stored and the refresh token the provider issued is revoked there."""
    idp = await tiny_idp_factory(flaw="aud")
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        started = await start_device(broker)
        status = await ended(broker, started.id, within=10)
        assert status["state"] == "failed"
        assert "aud does not match" in status["error"]
        assert (await broker.grant(PROVIDER, USER)).status == 404
        access_token, refresh_token, _id_token = idp.issued
        assert idp.revoked == [(refresh_token, "refresh_token")]
        broker.assert_not_logged(access_token, refresh_token)


async def test_a_provider_without_a_device_endpoint_is_refused_saying_how_to_name_one(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """Discovery names no device endpoint: 400, naming the config key; no login is created."""
    idp = await tiny_idp_factory()
    idp.advertise_device = False
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        reply = await broker.call(
            "POST", "/v1/logins", {"provider": PROVIDER, "user": USER, "method": "device"}
        )
        assert reply.status == 400
        problem = reply.json()
        assert problem["code"] == "bad_request"
        assert "offers no device authorization endpoint" in problem["detail"]
        assert f"device_authorization_endpoint in [providers.{PROVIDER}]" in problem["detail"]
        assert idp.device_codes == []


async def test_the_configured_device_endpoint_is_used_when_discovery_names_none(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """device_authorization_endpoint in the provider's config overrides discovery: the same
    provider that was refused above now completes a device login."""
    idp = await tiny_idp_factory()
    idp.advertise_device = False
    provider = tiny(idp) | {"device_authorization_endpoint": idp.device_endpoint}
    async with serving_broker(tmp_path, log_dir, {PROVIDER: provider}) as broker:
        started = await start_device(broker)
        assert (await ended(broker, started.id, within=10))["state"] == "complete"
        assert len(idp.device_codes) == 1


async def test_a_device_endpoint_refusing_the_client_is_a_bad_request_saying_what_to_allow(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """A provider that answers unauthorized_client at the device endpoint itself (not at the
    token endpoint, as django-oauth-toolkit does): 400 naming the client and the fix."""
    idp = await tiny_idp_factory()
    idp.device_refusal = "unauthorized_client"
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        reply = await broker.call(
            "POST", "/v1/logins", {"provider": PROVIDER, "user": USER, "method": "device"}
        )
        assert reply.status == 400
        detail = reply.json()["detail"]
        assert "does not allow client tiny-test the device grant (unauthorized_client)" in detail
        assert "allow it at the provider" in detail
