"""RFC 8628 without sockets: the device authorization answer, each poll answer, the poll loop.

`wait_for_approval` runs with a fake clock whose `sleep` moves it, so the intervals it waits are
read off exactly and nothing here sleeps for real.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.errors import IdpError, IdpRejected
from broker.idp.device import (
    DEFAULT_INTERVAL,
    EXPIRED,
    MAX_BACKOFF,
    MAX_EXPIRES_IN,
    DeviceAuthorization,
    Granted,
    PollOutcome,
    Refused,
    Waiting,
    parse_device_authorization,
    poll_outcome,
    wait_for_approval,
)
from broker.idp.http import HttpResponse

CLIENT = "broker-device"


def answer(status: int, body: object, headers: dict[str, str] | None = None) -> HttpResponse:
    """A provider's answer with a JSON body."""
    return HttpResponse(status, headers or {}, json.dumps(body).encode())


def authorization(new_secret: Callable[[str], str], **changes: Any) -> dict[str, Any]:
    """A well-formed device authorization answer, with `changes` applied (None removes)."""
    body: dict[str, Any] = {
        "device_code": new_secret("device"),
        "user_code": "WDJB-MJHT",
        "verification_uri": "https://idp.example.nl/device",
        "verification_uri_complete": "https://idp.example.nl/device?user_code=WDJB-MJHT",
        "expires_in": 1800,
        "interval": 5,
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


# -- the device authorization answer ------------------------------------------------------------


def test_a_complete_answer_is_parsed_with_the_device_code_kept_secret(
    new_secret: Callable[[str], str],
) -> None:
    """Every field is taken; the device code is a Secret whose repr hides it."""
    body = authorization(new_secret)
    device = parse_device_authorization(answer(200, body))
    assert device.device_code.reveal() == body["device_code"]
    assert body["device_code"] not in repr(device)
    assert (device.user_code, device.verification_uri) == ("WDJB-MJHT", body["verification_uri"])
    assert device.verification_uri_complete == body["verification_uri_complete"]
    assert (device.expires_in, device.interval) == (1800, 5)


def test_the_answer_survives_sealing_as_json(new_secret: Callable[[str], str]) -> None:
    """What a pending login keeps sealed reads back as the same answer."""
    device = parse_device_authorization(answer(200, authorization(new_secret)))
    again = DeviceAuthorization.from_json(device.as_json())
    assert again.device_code.reveal() == device.device_code.reveal()
    assert (again.user_code, again.verification_uri, again.interval, again.expires_in) == (
        device.user_code,
        device.verification_uri,
        device.interval,
        device.expires_in,
    )


def test_optional_fields_default_as_the_rfc_says(new_secret: Callable[[str], str]) -> None:
    """No interval means 5 s; no complete URI stays None; Google's verification_url is read."""
    body = authorization(
        new_secret,
        interval=None,
        verification_uri_complete=None,
        verification_uri=None,
        verification_url="https://www.google.com/device",
    )
    device = parse_device_authorization(answer(200, body))
    assert device.interval == DEFAULT_INTERVAL
    assert device.verification_uri_complete is None
    assert device.verification_uri == "https://www.google.com/device"


def test_a_code_lifetime_past_an_hour_is_polled_for_an_hour(
    new_secret: Callable[[str], str],
) -> None:
    """expires_in is capped, so a provider's day-long codes do not keep a poller a day."""
    device = parse_device_authorization(answer(200, authorization(new_secret, expires_in=86400)))
    assert device.expires_in == MAX_EXPIRES_IN


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"device_code": None}, "device_code"),
        ({"device_code": "has space"}, "device_code"),
        ({"user_code": None}, "user_code"),
        ({"user_code": "AB\x1b[2JCD"}, "user_code"),  # a terminal escape, shown to a person
        ({"user_code": "X" * 65}, "user_code"),
        ({"verification_uri": None}, "verification_uri"),
        ({"verification_uri": "javascript:alert(1)"}, "verification_uri"),
        ({"verification_uri_complete": "file:///etc/passwd"}, "verification_uri_complete"),
        ({"expires_in": None}, "expires_in"),
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": "1e400"}, "expires_in"),
        ({"interval": -1}, "interval"),
    ],
)
def test_an_answer_with_an_unusable_field_is_an_error_naming_it(
    new_secret: Callable[[str], str], changes: dict[str, Any], complaint: str
) -> None:
    """A missing or unsafe field is refused with an IdpError that names the field."""
    with pytest.raises(IdpError, match=complaint):
        parse_device_authorization(answer(200, authorization(new_secret, **changes)))


def test_a_refusal_of_the_device_authorization_keeps_the_providers_error_code() -> None:
    """unauthorized_client at this step is an IdpRejected carrying the code, for the message."""
    with pytest.raises(IdpRejected) as caught:
        parse_device_authorization(answer(400, {"error": "unauthorized_client"}))
    assert caught.value.error == "unauthorized_client"


# -- one poll -----------------------------------------------------------------------------------


def test_a_200_to_a_poll_is_the_tokens(new_secret: Callable[[str], str]) -> None:
    """The token response of an approved login is Granted, its tokens parsed."""
    access = new_secret("at")
    outcome = poll_outcome(
        answer(200, {"access_token": access, "token_type": "Bearer", "expires_in": 60}), 5, CLIENT
    )
    assert isinstance(outcome, Granted)
    assert outcome.tokens.access_token is not None
    assert outcome.tokens.access_token.reveal() == access


def test_pending_keeps_the_interval_and_slow_down_adds_five_seconds() -> None:
    """authorization_pending: same interval; slow_down: 5 s more (RFC 8628 section 3.5)."""
    assert poll_outcome(answer(400, {"error": "authorization_pending"}), 7, CLIENT) == Waiting(7)
    slower = poll_outcome(answer(400, {"error": "slow_down"}), 7, CLIENT)
    assert isinstance(slower, Waiting)
    assert slower.interval == 12


@pytest.mark.parametrize(
    ("status", "error", "words"),
    [
        (400, "access_denied", "denied"),
        (400, "expired_token", "expired before anyone entered it"),
        (400, "unauthorized_client", f"does not allow client {CLIENT} the device grant"),
        (401, "invalid_client", "check the provider's client_id"),
        (400, "invalid_grant", "start a new login"),
        (404, "device_not_found", "no longer knows this login's device code"),
        (400, "invalid_scope", "refused the login (invalid_scope)"),
    ],
)
def test_errors_that_end_the_login_say_what_to_do(status: int, error: str, words: str) -> None:
    """Each terminal error is Refused with its code and a reason a person can act on."""
    outcome = poll_outcome(answer(status, {"error": error}), 5, CLIENT)
    assert isinstance(outcome, Refused)
    assert outcome.error == error
    assert words in outcome.reason


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_a_provider_that_is_overloaded_or_failing_is_polled_less_often(status: int) -> None:
    """429 and 5xx are no verdict: wait twice as long (at most a minute) and ask again."""
    outcome = poll_outcome(HttpResponse(status, {}, b"busy"), 5, CLIENT)
    assert outcome == Waiting(10, f"the token endpoint answered {status}")
    capped = poll_outcome(HttpResponse(status, {}, b"busy"), 50, CLIENT)
    assert isinstance(capped, Waiting)
    assert capped.interval == MAX_BACKOFF


def test_an_answer_that_is_no_oauth_error_ends_the_login_naming_the_status() -> None:
    """A 403 page is not something the next poll would change: Refused, naming the status."""
    outcome = poll_outcome(HttpResponse(403, {"Content-Type": "text/html"}, b"<h1>no</h1>"), 5, "c")
    assert isinstance(outcome, Refused)
    assert "403" in outcome.reason


def test_an_unusable_200_ends_the_login_instead_of_polling_on() -> None:
    """A 200 without tokens cannot be retried into tokens; the reason says the answer was bad."""
    outcome = poll_outcome(HttpResponse(200, {}, b"not json"), 5, CLIENT)
    assert isinstance(outcome, Refused)
    assert "unusable" in outcome.reason


# -- the poll loop ------------------------------------------------------------------------------


class FakeTime:
    """A clock that only `sleep` moves; it records every sleep."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.sleeps: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)


class ScriptedProvider:
    """Answers polls from a script and records the interval each poll was made with."""

    def __init__(self, clock: FakeTime, script: list[PollOutcome | str]) -> None:
        self.clock = clock
        self.script = script
        self.polled_at: list[datetime] = []

    async def poll(self, interval: int) -> PollOutcome:
        self.polled_at.append(self.clock())
        step = self.script.pop(0)
        if isinstance(step, str):  # an OAuth error code, as the token endpoint would send
            return poll_outcome(answer(400, {"error": step}), interval, CLIENT)
        return step


async def test_slow_down_slows_this_and_every_later_poll_by_five_seconds(
    new_secret: Callable[[str], str],
) -> None:
    """Polls wait 5, 5, then 10 after the first slow_down and 15 after the second, for good."""
    time = FakeTime()
    granted = poll_outcome(answer(200, {"access_token": new_secret("at")}), 5, CLIENT)
    assert isinstance(granted, Granted)
    provider = ScriptedProvider(
        time,
        [
            "authorization_pending",
            "slow_down",
            "authorization_pending",
            "slow_down",
            "authorization_pending",
            granted,
        ],
    )
    notes: list[Waiting] = []
    outcome = await wait_for_approval(
        provider.poll,
        interval=5,
        expires_at=time.now + timedelta(minutes=10),
        clock=time,
        sleep=time.sleep,
        noticed=notes.append,
    )
    assert outcome is granted
    assert time.sleeps == [5, 5, 10, 10, 15, 15]
    assert [w.interval for w in notes] == [10, 15]


async def test_the_loop_stops_at_the_codes_expiry_without_polling_after_it() -> None:
    """With nobody approving, the last sleep ends exactly at expiry and no poll follows it."""
    time = FakeTime()
    start = time.now
    provider = ScriptedProvider(time, ["authorization_pending"] * 100)
    outcome = await wait_for_approval(
        provider.poll,
        interval=5,
        expires_at=start + timedelta(seconds=12),
        clock=time,
        sleep=time.sleep,
    )
    assert outcome == Refused("expired_token", EXPIRED)
    assert time.sleeps == [5, 5, 2]
    assert [t - start for t in provider.polled_at] == [timedelta(seconds=5), timedelta(seconds=10)]


async def test_a_refusal_ends_the_loop_at_once() -> None:
    """access_denied on the second poll is the loop's result; there is no third poll."""
    time = FakeTime()
    provider = ScriptedProvider(time, ["authorization_pending", "access_denied", "slow_down"])
    outcome = await wait_for_approval(
        provider.poll,
        interval=1,
        expires_at=time.now + timedelta(minutes=1),
        clock=time,
        sleep=time.sleep,
    )
    assert isinstance(outcome, Refused)
    assert outcome.error == "access_denied"
    assert len(provider.polled_at) == 2


async def test_a_clock_that_jumps_past_expiry_during_a_sleep_ends_the_loop_without_a_poll() -> None:
    """The expiry is checked again after each sleep: a suspended machine does not poll late."""
    time = FakeTime()
    expires_at = time.now + timedelta(minutes=1)

    async def suspended(seconds: float) -> None:
        time.now += timedelta(hours=1)

    provider = ScriptedProvider(time, [])
    outcome = await wait_for_approval(
        provider.poll, interval=5, expires_at=expires_at, clock=time, sleep=suspended
    )
    assert outcome == Refused("expired_token", EXPIRED)
    assert provider.polled_at == []
