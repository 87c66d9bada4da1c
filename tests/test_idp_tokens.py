"""Token endpoint answers: what parses into a TokenResponse, and which IdpError each failure is.

Invariant 4 and 5 of ROTATION.md hang on this classification: a malformed 200 may mean the IdP
already rotated (ambiguous), only invalid_grant / invalid_client / unauthorized_client end a
grant, and 429 or 5xx only back off. Every response comes over real HTTP from a loopback server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.errors import IdpAmbiguous, IdpError, IdpNotProcessed, IdpRejected
from broker.idp.http import HttpResponse, send
from broker.idp.tokens import MAX_DESCRIPTION, MAX_LIFETIME, TokenResponse, parse_token_response
from broker.model import Secret

NewSecret = Callable[[str], str]
Respond = Callable[..., Awaitable[HttpResponse]]
JSON = "application/json"


class TokenEndpoint:
    """A loopback token endpoint that answers whatever the test last set."""

    def __init__(self) -> None:
        self.answer = web.Response(status=500)

    async def handle(self, request: web.Request) -> web.Response:
        """Read the request, then send the canned answer."""
        await request.read()
        return self.answer


def _encode(body: object) -> bytes:
    """bytes as they are, str as UTF-8, anything else as JSON."""
    if isinstance(body, bytes):
        return body
    return body.encode() if isinstance(body, str) else json.dumps(body).encode()


@pytest.fixture
async def respond() -> AsyncIterator[Respond]:
    """Serve one canned answer from a loopback token endpoint and return what send() read."""
    endpoint = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/o/token/", endpoint.handle)
    async with (
        TestServer(app, host="127.0.0.1") as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):

        async def answer(
            status: int,
            body: object,
            content_type: str = JSON,
            headers: Mapping[str, str] | None = None,
        ) -> HttpResponse:
            all_headers = {"Content-Type": content_type, **(headers or {})}
            endpoint.answer = web.Response(status=status, body=_encode(body), headers=all_headers)
            url = f"http://127.0.0.1:{server.port}/o/token/"
            return await send(session, "POST", url, data="grant_type=refresh_token")

        yield answer


async def parse(respond: Respond, status: int, body: object, **kw: object) -> TokenResponse:
    """The TokenResponse for a canned answer (raises what parse_token_response raises)."""
    return parse_token_response(await respond(status, body, **kw))


async def error(respond: Respond, status: int, body: object, **kw: object) -> IdpError:
    """The IdpError a canned answer stands for."""
    with pytest.raises(IdpError) as info:
        await parse(respond, status, body, **kw)
    return info.value


# --- 200 ----------------------------------------------------------------------------------------


async def test_valid_200_parses_into_secret_fields(respond: Respond, new_secret: NewSecret) -> None:
    """A complete 200 yields every token wrapped in Secret, and the repr shows none of them."""
    access, refresh, id_token = new_secret("at"), new_secret("rt"), new_secret("idt")
    tokens = await parse(
        respond,
        200,
        {
            "access_token": access,
            "token_type": "bearer",
            "expires_in": 3600,
            "refresh_token": refresh,
            "id_token": id_token,
            "scope": "openid profile FGO",
        },
    )
    assert tokens.access_token == Secret(access)
    assert tokens.refresh_token == Secret(refresh)
    assert tokens.id_token == Secret(id_token)
    assert isinstance(tokens.access_token, Secret)
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in == 3600
    assert tokens.scope == ("openid", "profile", "FGO")
    for value in (access, refresh, id_token):
        assert value not in repr(tokens)


async def test_200_with_only_an_id_token_is_accepted(
    respond: Respond, new_secret: NewSecret
) -> None:
    """An OIDC answer carrying its access token inside the ID token (netID) has no access_token."""
    tokens = await parse(respond, 200, {"id_token": new_secret("idt"), "token_type": "Bearer"})
    assert tokens.access_token is None
    assert tokens.id_token is not None
    assert tokens.refresh_token is None
    assert tokens.expires_in is None
    assert tokens.scope is None


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3600", 3600), (" 3600 ", 3600), (3600.9, 3600), (1, 1), (MAX_LIFETIME, MAX_LIFETIME)],
)
async def test_numeric_expires_in_is_accepted(
    respond: Respond, value: object, seconds: int
) -> None:
    """expires_in as a number or a numeric string is whole seconds."""
    tokens = await parse(respond, 200, {"access_token": "at", "expires_in": value})
    assert tokens.expires_in == seconds


MALFORMED_200: dict[str, bytes | str | object] = {
    "html": "<html><body>Service temporarily unavailable</body></html>",
    "truncated-json": '{"access_token": "at-1", "refresh_token": "rt',
    "json-array": [{"access_token": "at-1"}],
    "json-string": json.dumps("at-1"),
    "empty-body": b"",
    "not-utf8": b'{"access_token": "\xff\xfe"}',
    "deeply-nested": b"[" * 100_000,
    "no-access-or-id-token": {"refresh_token": "rt-1", "token_type": "Bearer"},
    "null-tokens": {"access_token": None, "id_token": None},
    "access-token-number": {"access_token": 12345},
    "access-token-empty": {"access_token": ""},
    "access-token-with-space": {"access_token": "at 1"},
    "access-token-with-newline": {"access_token": "at\n1"},
    "refresh-token-object": {"access_token": "at", "refresh_token": {"value": "rt"}},
    "id-token-with-tab": {"id_token": "a.b\t.c"},
    "token-type-number": {"access_token": "at", "token_type": 5},
    "token-type-with-newline": {"access_token": "at", "token_type": "Bearer\r\nX-Evil: 1"},
    "token-type-with-space": {"access_token": "at", "token_type": "Bear er"},
    "token-type-too-long": {"access_token": "at", "token_type": "B" * 65},
    "expires-in-true": {"access_token": "at", "expires_in": True},
    "expires-in-false": {"access_token": "at", "expires_in": False},
    "expires-in-negative": {"access_token": "at", "expires_in": -1},
    "expires-in-zero": {"access_token": "at", "expires_in": 0},
    "expires-in-absurd": {"access_token": "at", "expires_in": 10**12},
    "expires-in-over-ten-years": {"access_token": "at", "expires_in": MAX_LIFETIME + 1},
    "expires-in-words": {"access_token": "at", "expires_in": "an hour"},
    "expires-in-list": {"access_token": "at", "expires_in": [3600]},
    "expires-in-negative-string": {"access_token": "at", "expires_in": "-5"},
    "expires-in-superscript": {"access_token": "at", "expires_in": "\u00b2"},
    "expires-in-5000-digits": {"access_token": "at", "expires_in": "9" * 5000},
    "expires-in-infinity": b'{"access_token": "at", "expires_in": Infinity}',
    "expires-in-1e400": b'{"access_token": "at", "expires_in": 1e400}',
    "expires-in-nan": b'{"access_token": "at", "expires_in": NaN}',
}


@pytest.mark.parametrize("case", MALFORMED_200)
async def test_malformed_200_is_ambiguous(respond: Respond, case: str) -> None:
    """A 200 the broker cannot use may still mean the IdP rotated: ambiguous, never a crash."""
    content_type = "text/html" if case == "html" else JSON
    exc = await error(respond, 200, MALFORMED_200[case], content_type=content_type)
    assert type(exc) is IdpAmbiguous
    assert exc.outcome == "ambiguous"
    assert "at-1" not in str(exc)
    assert "rt-1" not in str(exc)


# --- OAuth errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "terminal", "client_error"),
    [
        (400, "invalid_grant", True, False),
        (400, "invalid_client", False, True),
        (401, "invalid_client", False, True),
        (400, "unauthorized_client", False, True),
        (400, "invalid_request", False, False),
        (400, "invalid_scope", False, False),
        (400, "unsupported_grant_type", False, False),
        (401, "invalid_token", False, False),
    ],
)
async def test_oauth_errors_are_rejections_and_only_invalid_grant_is_terminal(
    respond: Respond, status: int, code: str, terminal: bool, client_error: bool
) -> None:
    """Only invalid_grant ends a grant; invalid_client and unauthorized_client are about the
    client's registration, not the user (invariant 5)."""
    exc = await error(respond, status, {"error": code, "error_description": "nope"})
    assert isinstance(exc, IdpRejected)
    assert exc.error == code
    assert exc.status == status
    assert exc.description == "nope"
    assert exc.terminal is terminal
    assert exc.client_error is client_error
    assert exc.outcome == ("invalid_grant" if terminal else "transient_error")
    assert code in str(exc)


async def test_rejection_keeps_retry_after(respond: Respond) -> None:
    """A 400 with Retry-After carries it on the rejection."""
    exc = await error(respond, 400, {"error": "invalid_request"}, headers={"Retry-After": "12"})
    assert isinstance(exc, IdpRejected)
    assert exc.retry_after == 12.0
    assert exc.description is None


async def test_429_with_retry_after_is_not_processed(respond: Respond) -> None:
    """Rate limiting says the provider did not act: back off by its Retry-After, end nothing."""
    exc = await error(respond, 429, {"error": "slow_down"}, headers={"Retry-After": "30"})
    assert type(exc) is IdpNotProcessed
    assert exc.outcome == "transient_error"
    assert exc.retry_after == 30.0


async def test_retry_after_as_a_date_is_ignored(respond: Respond) -> None:
    """Retry-After in HTTP-date form is not read as seconds (the caller's own back-off applies)."""
    headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    exc = await error(respond, 429, "", content_type="text/plain", headers=headers)
    assert type(exc) is IdpNotProcessed
    assert exc.retry_after is None


@pytest.mark.parametrize("status", [500, 501, 502, 504, 599])
async def test_5xx_other_than_503_is_ambiguous(respond: Respond, status: int) -> None:
    """A server or gateway error may come after the IdP processed the refresh."""
    exc = await error(respond, status, "<html>Bad Gateway</html>", content_type="text/html")
    assert type(exc) is IdpAmbiguous
    assert exc.retry_after is None
    assert str(status) in str(exc)


async def test_503_is_not_processed_and_keeps_retry_after(respond: Respond) -> None:
    """A 503 says the provider (or its load balancer) did not act, and when to come back."""
    exc = await error(
        respond, 503, {"error": "temporarily_unavailable"}, headers={"Retry-After": "5"}
    )
    assert type(exc) is IdpNotProcessed
    assert exc.retry_after == 5.0
    assert "did not act" in str(exc)


@pytest.mark.parametrize(
    ("status", "body", "content_type", "shape"),
    [
        (400, "<html><h1>Bad Request</h1></html>", "text/html", "text/html"),
        (400, {"message": "bad"}, JSON, "JSON"),
        (400, {"error": 17}, JSON, "JSON"),
        (403, {"error": "invalid_grant"}, JSON, "JSON"),
        (302, "", "text/plain", "text/plain"),
    ],
)
async def test_other_refusals_are_not_processed(
    respond: Respond, status: int, body: object, content_type: str, shape: str
) -> None:
    """A refusal with no usable OAuth error (an HTML 400, a WAF 403, a redirect) means the
    provider did not act: transient, not terminal, and the token is unspent."""
    exc = await error(respond, status, body, content_type=content_type)
    assert type(exc) is IdpNotProcessed
    assert exc.outcome == "transient_error"
    assert f"answered {status} with {shape}" in str(exc)


HOSTILE_DESCRIPTIONS = {
    "quotes-and-non-ascii": 'Ungültig "token" — ✓',
    "backslashes": "C:\\path\\to\\nowhere \\u0000",
    "controls": "line one\r\nline two\x00\x1b[31mred\x1b[0m\x7f\u200b\ud800",
    "ten-kilobytes": "é" * 10_000,
}


@pytest.mark.parametrize("description", HOSTILE_DESCRIPTIONS.values(), ids=HOSTILE_DESCRIPTIONS)
async def test_error_description_is_cleaned_and_bounded(respond: Respond, description: str) -> None:
    """Any error_description is kept printable and at most MAX_DESCRIPTION characters."""
    body = json.dumps({"error": "invalid_grant", "error_description": description})
    exc = await error(respond, 400, body)
    assert isinstance(exc, IdpRejected)
    assert exc.terminal
    assert exc.description is not None
    assert 0 < len(exc.description) <= MAX_DESCRIPTION
    assert all(ch.isprintable() for ch in exc.description)
    assert exc.description in str(exc)


async def test_error_description_keeps_quotes_backslashes_and_non_ascii(respond: Respond) -> None:
    """Cleaning removes only control characters: the rest of the text arrives unchanged."""
    text = 'Ungültig "token" — ✓ C:\\tmp'
    exc = await error(respond, 400, {"error": "invalid_grant", "error_description": text})
    assert isinstance(exc, IdpRejected)
    assert exc.description == text


async def test_error_code_is_cleaned_and_bounded(respond: Respond) -> None:
    """A hostile error code is bounded too; it is not one of the terminal ones."""
    exc = await error(respond, 400, {"error": "invalid_grant\n" + "x" * 1000})
    assert isinstance(exc, IdpRejected)
    assert len(exc.error) <= 64
    assert "\n" not in exc.error
    assert not exc.terminal


async def test_non_string_description_is_dropped(respond: Respond) -> None:
    """An error_description that is not a string is ignored, not shown."""
    exc = await error(respond, 400, {"error": "invalid_grant", "error_description": ["a", "b"]})
    assert isinstance(exc, IdpRejected)
    assert exc.description is None
    assert exc.terminal
