"""RFC 8628, the device authorization grant: its two answers, and what each poll means.

    authorize   POST device_authorization_endpoint (client authentication as configured, scope)
                -> DeviceAuthorization: device_code (a Secret), user_code, verification URIs,
                   expires_in, interval
    poll        POST token_endpoint (grant_type=urn:ietf:params:oauth:grant-type:device_code,
                device_code) -> one PollOutcome:

                Granted   200: the token response
                Waiting   authorization_pending: the same interval
                          slow_down: the interval grows by 5 s, for this and every later poll
                          429, 5xx, or no answer: the interval doubles (to at most a minute)
                Refused   access_denied, expired_token, unauthorized_client and every other
                          answer: the login is over; `reason` says what a person can do

`wait_for_approval` is the polling loop, with the poll, the clock and the sleep injected; the
parsing and the decisions are pure.
"""

from __future__ import annotations

import asyncio
import json
import math
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from broker.errors import IdpError, IdpRejected
from broker.idp.http import HttpResponse
from broker.idp.tokens import TokenResponse, error_for, parse_token_response
from broker.model import Secret

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL = 5  # RFC 8628 section 3.2: when the provider names none
SLOW_DOWN_STEP = 5  # section 3.5: slow_down adds five seconds
MAX_BACKOFF = 60  # the longest wait after a provider that could not be reached
MAX_INTERVAL = 300  # a provider asking for more is polled every five minutes all the same
# The broker polls no longer than this, whatever the provider's codes live.
MAX_EXPIRES_IN = 3600
MAX_USER_CODE = 64
EXPIRED = "the code expired before anyone entered it: start a new login"
_ENDPOINT = "the device authorization endpoint"


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """The provider's answer to a device authorization request (RFC 8628 section 3.2)."""

    device_code: Secret
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int

    def as_json(self) -> str:
        """The answer as JSON, to be sealed while the login is pending."""
        return json.dumps(
            {
                "device_code": self.device_code.reveal(),
                "user_code": self.user_code,
                "verification_uri": self.verification_uri,
                "verification_uri_complete": self.verification_uri_complete,
                "expires_in": self.expires_in,
                "interval": self.interval,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> DeviceAuthorization:
        """What `as_json` wrote."""
        data = json.loads(text)
        return cls(
            device_code=Secret(data["device_code"]),
            user_code=data["user_code"],
            verification_uri=data["verification_uri"],
            verification_uri_complete=data["verification_uri_complete"],
            expires_in=int(data["expires_in"]),
            interval=int(data["interval"]),
        )


@dataclass(frozen=True, slots=True)
class Granted:
    """The person approved: the token endpoint answered with tokens."""

    tokens: TokenResponse


@dataclass(frozen=True, slots=True)
class Waiting:
    """Poll again after `interval` seconds; `note` says why when it is not plain waiting."""

    interval: int
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """The login is over; `error` is the provider's code (or a description of the answer)."""

    error: str
    reason: str


PollOutcome = Granted | Waiting | Refused


def parse_device_authorization(response: HttpResponse) -> DeviceAuthorization:
    """A 200 parsed and checked, or the IdpError the answer stands for."""
    if response.status != 200:
        raise error_for(response, _ENDPOINT)
    data = _json_object(response.body)
    if data is None:
        raise IdpError(f"{_ENDPOINT} answered 200 with a body that is not a JSON object")
    device_code = data.get("device_code")
    if not isinstance(device_code, str) or not device_code or _has_space_or_control(device_code):
        raise IdpError(f"{_ENDPOINT} sent no usable device_code")
    user_code = data.get("user_code")
    if (
        not isinstance(user_code, str)
        or not user_code.strip()
        or len(user_code) > MAX_USER_CODE
        or any(unicodedata.category(ch)[0] == "C" for ch in user_code)
    ):
        raise IdpError(f"{_ENDPOINT} sent no usable user_code")
    # "verification_url" is what some providers (Google's among them) send instead.
    uri = _url(data.get("verification_uri", data.get("verification_url")), "verification_uri")
    if uri is None:
        raise IdpError(f"{_ENDPOINT} sent no verification_uri")
    complete = _url(data.get("verification_uri_complete"), "verification_uri_complete")
    return DeviceAuthorization(
        device_code=Secret(device_code),
        user_code=user_code.strip(),
        verification_uri=uri,
        verification_uri_complete=complete,
        expires_in=min(_seconds(data.get("expires_in"), "expires_in"), MAX_EXPIRES_IN),
        interval=_interval(data.get("interval")),
    )


def poll_outcome(response: HttpResponse, interval: int, client_id: str) -> PollOutcome:
    """What one answer of the token endpoint to a device-code poll means for the login."""
    if response.status == 200:
        try:
            return Granted(parse_token_response(response))
        except IdpError as exc:
            return Refused("unusable_response", f"the provider's tokens are unusable: {exc}")
    return _poll_error(response, interval, client_id)


def _poll_error(response: HttpResponse, interval: int, client_id: str) -> PollOutcome:
    data = _json_object(response.body)
    error = data.get("error") if data is not None else None
    if error == "authorization_pending":
        return Waiting(interval)
    if error == "slow_down":
        return Waiting(
            min(interval + SLOW_DOWN_STEP, MAX_INTERVAL), "the provider asked to slow down"
        )
    reason = refusal_reason(error, client_id) if isinstance(error, str) else None
    if reason is not None:
        return Refused(str(error), reason)
    if response.status == 429 or response.status >= 500:
        return unanswered(interval, f"the token endpoint answered {response.status}")
    # Every other answer is an error the next poll would repeat.
    rejection = error_for(response)
    if isinstance(rejection, IdpRejected):
        detail = f": {rejection.description}" if rejection.description else ""
        return Refused(
            rejection.error, f"the provider refused the login ({rejection.error}){detail}"
        )
    return Refused(f"http_{response.status}", str(rejection))


def unanswered(interval: int, note: str) -> Waiting:
    """After a poll that got no usable answer: poll less often (RFC 8628 section 3.5)."""
    return Waiting(max(interval, min(interval * 2, MAX_BACKOFF)), note)


def refusal_reason(error: str, client_id: str) -> str | None:
    """What a person can do about a poll error that ends the login; None for unknown errors."""
    gone = f"the provider no longer knows this login's device code ({error}): start a new login"
    reasons = {
        "access_denied": "the person at the provider denied the login (access_denied)",
        "expired_token": EXPIRED,
        "unauthorized_client": f"the provider does not allow client {client_id} the device "
        "grant (unauthorized_client): allow it at the provider, or log in without --device",
        "invalid_client": f"the provider does not accept client {client_id} (invalid_client): "
        "check the provider's client_id and client_secret_file",
        "invalid_grant": gone,
        "device_not_found": gone,  # django-oauth-toolkit's own word for it, with a 404
    }
    return reasons.get(error)


async def wait_for_approval(
    poll: Callable[[int], Awaitable[PollOutcome]],
    *,
    interval: int,
    expires_at: datetime,
    clock: Callable[[], datetime],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    noticed: Callable[[Waiting], None] = lambda _waiting: None,
) -> Granted | Refused:
    """Poll every `interval` seconds (as the answers change it) until the provider grants or
    refuses, or `expires_at` passes; `noticed` hears of every wait that has a note."""
    while True:
        remaining = (expires_at - clock()).total_seconds()
        if remaining <= 0:
            return Refused("expired_token", EXPIRED)
        await sleep(min(interval, remaining))
        if clock() >= expires_at:
            return Refused("expired_token", EXPIRED)
        outcome = await poll(interval)
        if not isinstance(outcome, Waiting):
            return outcome
        if outcome.note is not None:
            noticed(outcome)
        interval = outcome.interval


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _has_space_or_control(text: str) -> bool:
    return any(ch.isspace() or unicodedata.category(ch)[0] == "C" for ch in text)


def _url(value: object, name: str) -> str | None:
    """A URL fit to show a person: http(s), a host, no spaces or control characters."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 2048 or _has_space_or_control(value):
        raise IdpError(f"{_ENDPOINT} sent an unusable {name}")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise IdpError(f"{_ENDPOINT} sent an unusable {name}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise IdpError(f"{_ENDPOINT} sent a {name} that is not an http(s) URL")
    return value


def _seconds(value: object, name: str) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 1
    ):
        raise IdpError(f"{_ENDPOINT} sent no usable {name}")
    return math.ceil(value)


def _interval(value: object) -> int:
    if value is None:
        return DEFAULT_INTERVAL
    return min(max(_seconds(value, "interval"), 1), MAX_INTERVAL)
