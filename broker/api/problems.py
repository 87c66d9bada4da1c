"""RFC 9457 problem responses; the only place broker errors become HTTP statuses."""

from __future__ import annotations

import json

from aiohttp import web

from broker.errors import (
    BadRequest,
    BrokerError,
    Forbidden,
    GrantNotFound,
    ReauthRequired,
    TokenUnavailable,
    TooManyHeld,
)

PROBLEM_TYPE = "application/problem+json"

# (status, code, title) per error class; the first match in the MRO wins.
_PROBLEMS: dict[type[BrokerError], tuple[int, str, str]] = {
    BadRequest: (400, "bad_request", "Bad request"),
    Forbidden: (403, "forbidden", "Forbidden"),
    GrantNotFound: (404, "grant_not_found", "Grant not found"),
    ReauthRequired: (409, "reauth_required", "Re-authentication required"),
    TokenUnavailable: (503, "token_unavailable", "Token unavailable"),
    TooManyHeld: (429, "too_many_requests", "Too many requests"),
}

# Outcome label of token_broker_token_requests_total for each problem code.
OUTCOMES = {
    "bad_request": "bad_request",
    "unauthenticated": "unauthenticated",
    "forbidden": "forbidden",
    "grant_not_found": "not_found",
    "reauth_required": "reauth_required",
    "token_unavailable": "unavailable",
}


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """A problem+json response."""
    body = {
        "type": f"urn:token-broker:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_TYPE,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def classify(exc: BrokerError) -> tuple[int, str, str]:
    """(status, code, title) of a broker error."""
    for cls in type(exc).__mro__:
        if cls in _PROBLEMS:
            return _PROBLEMS[cls]
    return 500, "internal_error", "Internal error"


def problem_for(exc: BrokerError) -> web.Response:
    """The problem response for a broker error."""
    status, code, title = classify(exc)
    if status == 500:
        return problem(status, code, title, "the broker failed; see its log")
    headers = {}
    if isinstance(exc, TokenUnavailable | TooManyHeld):
        headers["Retry-After"] = str(exc.retry_after)
    return problem(status, code, title, str(exc), headers)


def unauthenticated(detail: str) -> web.Response:
    """401 with the bearer challenge."""
    return problem(
        401,
        "unauthenticated",
        "Unauthenticated",
        detail,
        {"WWW-Authenticate": 'Bearer realm="token-broker"'},
    )
