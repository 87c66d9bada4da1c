"""Thin request handlers: parse, call the grant service, shape JSON."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _quoted
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from broker.api.context import CALLER, CLOCK, LOGINS, METRICS, READINESS, SERVICE, WATCHES
from broker.api.problems import OUTCOMES, classify, problem_for
from broker.api.watch import MAX_WAIT_SECONDS, etag, matches, next_token
from broker.errors import BadRequest, BrokerError, Forbidden
from broker.grants import Import, check_user
from broker.login import METHODS, DeviceLoginStarted
from broker.model import Grant, GrantSummary, Secret

MAX_MIN_TTL = 86_400
MAX_SECRET_CHARS = 16_384
MAX_EXPIRES_IN = 10 * 365 * 86_400
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
NDJSON = "application/x-ndjson"
_TOKEN_PARAMETERS = frozenset({"min_ttl", "wait"})
_IMPORT_FIELDS = {
    "provider",
    "user",
    "refresh_token",
    "access_token",
    "expires_in",
    "scope",
    "force",
}


def rfc3339(moment: datetime | None) -> str | None:
    """UTC RFC 3339 with a Z, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def get_token(request: web.Request) -> web.Response:
    """GET /v1/tokens/{provider}/{user}: the access token, from memory in the steady state.

    With If-None-Match naming the served token's ETag: 304, at once or (with `wait`) when
    the wait ends without a new token; `broker.api.watch` holds such requests.
    """
    started = time.perf_counter()
    provider, user = request.match_info["provider"], request.match_info["user"]
    metrics = request.app[METRICS]
    condition = request.headers.get("If-None-Match")
    held = False
    try:
        check_user(user)
        min_ttl, wait = _token_query(request)
        caller = request[CALLER]
        if not caller.may_fetch(provider, user):
            raise Forbidden(f"caller {caller.name} may not fetch {provider}/{user}")
        service = request.app[SERVICE]
        grant = await service.token(provider, user, min_ttl)
        if condition is not None and wait is not None and matches(condition, etag(grant)):
            held = True
            grant = await next_token(
                request,
                request.app[WATCHES],
                grant,
                condition=condition,
                seconds=wait,
                caller=caller.name,
                clock=request.app[CLOCK],
                fetch=lambda: service.token(provider, user, min_ttl),
            )
    except BrokerError as exc:
        _status, code, _title = classify(exc)
        outcome = OUTCOMES.get(code, "unavailable")
        metrics.count_token_request(provider, outcome, _elapsed(started, held))
        return problem_for(exc)
    assert grant.tokens.access_token is not None
    assert grant.access_expires_at is not None
    tag = etag(grant)
    metrics.count_token_request(provider, "served", _elapsed(started, held))
    if condition is not None and matches(condition, tag):
        return web.Response(status=304, headers={**NO_STORE, "ETag": tag})
    body = token_body(grant, int(grant.access_ttl(request.app[CLOCK]())))
    return web.Response(body=body, headers=token_headers(tag))


def token_body(grant: Grant, expires_in: int) -> bytes:
    """The JSON body serving `grant`'s access token (see the token route)."""
    head, tail = token_body_around(grant)
    return head + str(expires_in).encode() + tail


def token_headers(tag: str) -> dict[str, str]:
    """A served token's own headers, in the order they are written (the fast path's prepared
    answers hold them in this order too)."""
    return {**NO_STORE, "ETag": tag, "Content-Type": "application/json"}


def token_body_around(grant: Grant) -> tuple[bytes, bytes]:
    """`token_body` before and after the `expires_in` number, which changes every second:
    the token path keeps these per grant version and puts the number in between.

    Written out with json.dumps's own separators (", " and ": ") and its quoting of a string
    (`encode_basestring_ascii`, what it uses with ensure_ascii), so the whole is what one
    json.dumps would give (tests/test_fast.py checks it for any strings), in a quarter of the
    time: a broker with more grants than the token path keeps answers for builds these for
    most requests."""
    assert grant.tokens.access_token is not None
    expires_at = rfc3339(grant.access_expires_at)
    head = (
        f'{{"access_token": {_quoted(grant.tokens.access_token.reveal())}, '
        f'"token_type": {_quoted(grant.token_type)}, "expires_in": '
    )
    tail = (
        f', "expires_at": {"null" if expires_at is None else _quoted(expires_at)}, '
        f'"scope": {_quoted(" ".join(grant.scopes))}, "provider": {_quoted(grant.provider)}, '
        f'"user": {_quoted(grant.user)}}}'
    )
    return head.encode(), tail.encode()


def _elapsed(started: float, held: bool) -> float | None:
    # A held request's time is the caller's chosen wait, not the broker's speed.
    return None if held else time.perf_counter() - started


def _token_query(request: web.Request) -> tuple[int, int | None]:
    """(min_ttl, wait) from the query; a misspelt parameter silently ignored would hand out
    a token about to expire, so anything else is refused."""
    query = request.query
    if not query:
        return 0, None
    unknown = sorted({name for name in query if name not in _TOKEN_PARAMETERS})
    if unknown:
        names = ", ".join(repr(name[:32]) for name in unknown[:5])
        raise BadRequest(f"unknown query parameter {names}; this route takes min_ttl and wait")
    min_ttl = _seconds(query, "min_ttl", 0, MAX_MIN_TTL)
    wait = _seconds(query, "wait", 1, MAX_WAIT_SECONDS)
    return (min_ttl or 0), wait


def _seconds(query: MultiMapping[str], name: str, low: int, high: int) -> int | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"give {name} once")
    if not values:
        return None
    raw = values[0]
    # isdigit() alone also accepts "²" and other non-ASCII digits, which int() refuses, and
    # int() refuses strings past 4300 digits: both must be a 400, not a 500.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 16 or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be a whole number of seconds from {low} to {high}")
    return int(raw)


def summary_json(summary: GrantSummary) -> dict[str, Any]:
    """The admin view of a grant."""
    return {
        "provider": summary.provider,
        "user": summary.user,
        "sub": summary.sub,
        "state": summary.state.value,
        "scopes": list(summary.scopes),
        "access_expires_at": rfc3339(summary.access_expires_at),
        "next_refresh_at": rfc3339(summary.next_refresh_at),
        "generation": summary.generation,
        "last_error": summary.last_error,
        "has_refresh_token": summary.has_refresh_token,
    }


def _require_admin(request: web.Request) -> None:
    caller = request[CALLER]
    if not caller.admin:
        raise Forbidden(f"caller {caller.name} is not an admin")


async def list_grants(request: web.Request) -> web.Response:
    """GET /v1/grants."""
    _require_admin(request)
    summaries = await request.app[SERVICE].summaries()
    return _json([summary_json(s) for s in summaries])


async def get_grant(request: web.Request) -> web.Response:
    """GET /v1/grants/{provider}/{user}."""
    _require_admin(request)
    provider, user = request.match_info["provider"], check_user(request.match_info["user"])
    return _json(summary_json(await request.app[SERVICE].summary(provider, user)))


async def import_grant(request: web.Request) -> web.Response:
    """POST /v1/grants: store a refresh token obtained elsewhere; with a body of
    application/x-ndjson, many at once (one import per line, stored in one transaction)."""
    _require_admin(request)
    if request.content_type == NDJSON:
        return await _import_lines(request)
    body = await _json_object(request)
    summary, created = await request.app[SERVICE].import_grant(
        import_of(body), request.app[CLOCK]()
    )
    return _json(summary_json(summary), status=201 if created else 200)


def import_of(body: dict[str, Any]) -> Import:
    """An import from the body of POST /v1/grants (or one line of a bulk import)."""
    unknown = sorted(set(body) - _IMPORT_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    access_token = _optional_secret(body, "access_token")
    expires_in = body.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int)
        or not 0 < expires_in <= MAX_EXPIRES_IN
    ):
        raise BadRequest(f"expires_in must be a whole number of seconds, 1 to {MAX_EXPIRES_IN}")
    scope = body.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise BadRequest("scope must be a space-separated string")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise BadRequest("force must be true or false")
    refresh_token = _optional_secret(body, "refresh_token")
    if refresh_token is None:
        raise BadRequest("refresh_token is required")
    return Import(
        provider=_string(body, "provider"),
        user=_string(body, "user"),
        refresh_token=refresh_token,
        access_token=access_token,
        expires_in=expires_in,
        scope=None if scope is None else tuple(scope.split()),
        force=force,
    )


async def _import_lines(request: web.Request) -> web.Response:
    """A bulk import: one result per line (its number counted from 1 in this request's body);
    a line that is wrong fails alone and says why, never with a secret in the reason."""
    try:
        text = (await request.read()).decode()
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    imports: list[tuple[int, Import]] = []
    failed: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            if "\\u" in line:  # only an escape can make a lone surrogate, which is not text
                json.dumps(body, ensure_ascii=False).encode()
        except (ValueError, UnicodeError, RecursionError):
            failed.append({"line": number, "reason": "not a JSON object in UTF-8"})
            continue
        try:
            if not isinstance(body, dict):
                raise BadRequest("the line must be a JSON object")
            imports.append((number, import_of(body)))
        except BadRequest as exc:
            failed.append({"line": number, "reason": str(exc)})
    outcomes = await request.app[SERVICE].import_many(
        [item for _, item in imports], request.app[CLOCK]()
    )
    created = replaced = 0
    for (number, _item), outcome in zip(imports, outcomes, strict=True):
        if outcome == "created":
            created += 1
        elif outcome == "replaced":
            replaced += 1
        else:
            failed.append({"line": number, "reason": outcome})
    failed.sort(key=lambda item: int(item["line"]))
    return _json({"created": created, "replaced": replaced, "failed": failed})


async def refresh_grant(request: web.Request) -> web.Response:
    """POST /v1/grants/{provider}/{user}/refresh: refresh now; the grant afterwards."""
    _require_admin(request)
    provider, user = request.match_info["provider"], check_user(request.match_info["user"])
    return _json(summary_json(await request.app[SERVICE].refresh_now(provider, user)))


async def revoke_grant(request: web.Request) -> web.Response:
    """DELETE /v1/grants/{provider}/{user}: revoke at the IdP where possible, then delete."""
    _require_admin(request)
    provider, user = request.match_info["provider"], check_user(request.match_info["user"])
    revoked = await request.app[SERVICE].revoke(provider, user)
    return _json(
        {"provider": provider, "user": user, "state": "revoked", "revoked_at_provider": revoked}
    )


_LOGIN_FIELDS = {"provider", "user", "force", "method"}


async def start_login(request: web.Request) -> web.Response:
    """POST /v1/logins: a pending login, and where to send the person (code flow) or what to
    tell them (device grant); 201 also when a device login was already pending (that same
    login again)."""
    _require_admin(request)
    body = await _json_object(request)
    unknown = sorted(set(body) - _LOGIN_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise BadRequest("force must be true or false")
    method = body.get("method")
    if "method" in body and method not in METHODS:
        raise BadRequest(f"method must be one of {', '.join(METHODS)}")
    started = await request.app[LOGINS].begin(
        _string(body, "provider"), _string(body, "user"), force, method, request.app[CLOCK]()
    )
    if isinstance(started, DeviceLoginStarted):
        device: dict[str, Any] = {
            "login_id": started.login_id,
            "verification_uri": started.verification_uri,
            "user_code": started.user_code,
            "expires_at": rfc3339(started.expires_at),
        }
        if started.verification_uri_complete is not None:
            device["verification_uri_complete"] = started.verification_uri_complete
        return _json(device, status=201, headers=NO_STORE)
    return _json(
        {
            "login_id": started.login_id,
            "authorize_url": started.authorize_url,
            "expires_at": rfc3339(started.expires_at),
        },
        status=201,
        headers=NO_STORE,
    )


async def login_status(request: web.Request) -> web.Response:
    """GET /v1/logins/{login_id}: pending, complete or failed (with the reason)."""
    _require_admin(request)
    record = await request.app[LOGINS].status(request.match_info["login_id"], request.app[CLOCK]())
    body: dict[str, Any] = {
        "state": record.status,
        "provider": record.provider,
        "user": record.user,
        "expires_at": rfc3339(record.expires_at),
    }
    if record.error is not None:
        body["error"] = record.error
    return _json(body)


async def healthz(_request: web.Request) -> web.Response:
    """GET /healthz: the process runs."""
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when the store, keys and refresher work; 503 with the reasons."""
    problems = await request.app[READINESS]()
    if problems:
        return _json({"status": "unavailable", "problems": problems}, status=503)
    return _json({"status": "ready"})


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise BadRequest("send a JSON body with Content-Type: application/json")
    try:
        body = json.loads(await request.read())
        # A lone surrogate (a "\ud800" escape) is valid JSON but no text the store can keep.
        json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, UnicodeError):
        raise BadRequest("the body is not valid JSON in UTF-8") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} is required and must be a non-empty string")
    return value


def _optional_secret(body: dict[str, Any], name: str) -> Secret | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_SECRET_CHARS:
        raise BadRequest(f"{name} must be a non-empty string of at most {MAX_SECRET_CHARS} chars")
    if value.split() != [value]:  # split() cuts at every character str.isspace() names
        raise BadRequest(f"{name} must not contain whitespace")
    return Secret(value)
