"""Token endpoint responses: parsed into a TokenResponse, or classified as an IdpError."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.errors import IdpAmbiguous, IdpError, IdpNotProcessed, IdpRejected
from broker.idp.http import HttpResponse
from broker.model import Secret
from broker.schedule import Failure, failure_class

MAX_LIFETIME = 10 * 365 * 86_400
# When a provider omits expires_in, assume a short life rather than serve an expired token.
ASSUMED_LIFETIME = 300
MAX_DESCRIPTION = 300


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """What a token endpoint returned; any token may be absent."""

    access_token: Secret | None
    token_type: str
    expires_in: int | None
    refresh_token: Secret | None
    id_token: Secret | None
    scope: tuple[str, ...] | None


MAX_TOKEN_TYPE = 64  # RFC 6749's types are short names ("Bearer", "DPoP", "N_A")
# Whitespace as str.isspace() has it (re's \s is the same test), found without a Python-level
# loop over a token's characters.
_SPACE = re.compile(r"\s")


def parse_token_response(response: HttpResponse) -> TokenResponse:
    """A 200 parsed, or the error the response stands for."""
    if response.status != 200:
        raise error_for(response)
    # A 200 whose body we cannot use may still mean the IdP rotated the refresh token.
    data = _json_object(response.body)
    if data is None:
        raise IdpAmbiguous("the token endpoint answered 200 with a body that is not a JSON object")
    access_token = _optional_token(data, "access_token")
    id_token = _optional_token(data, "id_token")
    if access_token is None and id_token is None:
        raise IdpAmbiguous("the token endpoint answered 200 without an access_token or id_token")
    token_type = _token_type(data.get("token_type", "Bearer"))
    if token_type is None:
        raise IdpAmbiguous("the token endpoint answered 200 with an invalid token_type")
    scope = data.get("scope")
    return TokenResponse(
        access_token=access_token,
        token_type=token_type,
        expires_in=parse_expires_in(data.get("expires_in")),
        refresh_token=_optional_token(data, "refresh_token"),
        id_token=id_token,
        scope=tuple(scope.split()) if isinstance(scope, str) else None,
    )


def parse_expires_in(value: object) -> int | None:
    """expires_in as whole seconds; None when absent; numeric strings are accepted."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        # float(), not int(): int() refuses "²" and strings of more than 4300 digits.
        value = float(value)
    # JSON also carries NaN and Infinity (1e400), which int() cannot convert.
    if isinstance(value, bool) or not isinstance(value, int | float) or _is_nan(value):
        raise IdpAmbiguous("the token endpoint sent an expires_in that is not a number")
    if not 1 <= value < MAX_LIFETIME + 1:
        raise IdpAmbiguous(
            f"the token endpoint sent expires_in={value!r:.24}, outside 1 second..10 years"
        )
    return int(value)


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def error_for(response: HttpResponse, endpoint: str = "the token endpoint") -> IdpError:
    """The IdpError a non-200 answer from a token (or revocation) endpoint stands for.

    Its class follows `broker.schedule.failure_class`: 429, 503 and other 4xx answers say the
    provider did not act (an OAuth error in a 400 or 401 is an IdpRejected, the rest
    IdpNotProcessed); 500, 502, 504 and anything else may come after it acted (IdpAmbiguous).
    """
    status = response.status
    retry_after = response.retry_after()
    data = _json_object(response.body)
    error = data.get("error") if data else None
    if status in (400, 401) and isinstance(error, str) and error:
        description = data.get("error_description") if data else None
        return IdpRejected(
            _clean(error, 64),
            _clean(description, MAX_DESCRIPTION) if isinstance(description, str) else None,
            status,
            retry_after,
        )
    if failure_class(sent=True, status=status) is Failure.AMBIGUOUS:
        # A gateway error or a crash: the IdP may have processed the request before failing.
        return IdpAmbiguous(f"{endpoint} answered {status}", retry_after=retry_after)
    shape = "JSON" if data is not None else (response.content_type or "an empty body")
    said = f"{endpoint} answered {status} with {shape} and no OAuth error"
    if status in (429, 503):
        said = f"{endpoint} answered {status}: it did not act; trying again later"
    return IdpNotProcessed(said, retry_after=retry_after)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the limit
        return None
    return data if isinstance(data, dict) else None


def _optional_token(data: dict[str, Any], name: str) -> Secret | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or _SPACE.search(value):
        raise IdpAmbiguous(f"the token endpoint sent a malformed {name}")
    return Secret(value)


def _clean(text: str, limit: int) -> str:
    """Printable text only, bounded: IdP error strings end up in logs and problem details."""
    printable = "".join(
        ch if unicodedata.category(ch)[0] not in "C" else " " for ch in text
    ).strip()
    return printable if len(printable) <= limit else printable[: limit - 1] + "…"


def access_token_in_claim(claims: Mapping[str, Any], claim: str) -> tuple[Secret, str, int | None]:
    """The access token, its type and lifetime from an ID token claim (netID's shape).

    The claim holds {"access_token", "token_type", "expires_in"}; anything else is an IdpError
    that names the claim.
    """
    value = claims.get(claim)
    if not isinstance(value, Mapping):
        raise IdpError(f"the ID token has no {claim} claim holding an access token")
    token = value.get("access_token")
    if not isinstance(token, str) or not token or _SPACE.search(token):
        raise IdpError(f"the ID token's {claim} claim has no usable access_token")
    token_type = _token_type(value.get("token_type", "Bearer"))
    if token_type is None:
        raise IdpError(f"the ID token's {claim} claim has an invalid token_type")
    try:
        expires_in = parse_expires_in(value.get("expires_in"))
    except IdpError:
        raise IdpError(f"the ID token's {claim} claim has an invalid expires_in") from None
    return Secret(token), token_type, expires_in


def _token_type(value: object) -> str | None:
    """A token_type as served ("Bearer" in its usual spelling), or None when it is not a
    short word of visible ASCII (it goes into JSON answers and Authorization header lines)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TOKEN_TYPE:
        return None
    if not all("!" <= ch <= "~" for ch in value):
        return None
    return "Bearer" if value.lower() == "bearer" else value
