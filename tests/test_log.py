"""Tests for broker.log: no secret value reaches the rendered output (ROTATION.md invariant 8)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.log import REDACTED, _apply_patterns, _scrub, configure_logging, get_logger, redact
from broker.model import Secret, TokenSet

ACCESS = "at-1f9c-ACCESS-VALUE"
REFRESH = "rt-7f3a-REFRESH-VALUE"
ID_TOKEN = "idt-55aa-ID-VALUE"
CLIENT_SECRET = "cs-0b0b-CLIENT-SECRET"
AUTH_CODE = "XYZ-AUTH-CODE-42"
VERIFIER = "pkce-verifier-9d9d-VALUE"
PASSWORD = "pw-hunter2-VALUE"
API_KEY = "ak-3c3c-API-KEY"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLVNFQ1JFVA"
LOCAL_SECRET = "local-only-REFRESH-in-frame"

ALL_SECRETS = (ACCESS, REFRESH, ID_TOKEN, CLIENT_SECRET, AUTH_CODE, VERIFIER, PASSWORD, API_KEY)


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo every change configure_logging makes so other test modules see pristine logging."""
    root = logging.getLogger()
    sqlalchemy = logging.getLogger("sqlalchemy")
    handlers, root_level, sqlalchemy_level = root.handlers[:], root.level, sqlalchemy.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(root_level)
    sqlalchemy.setLevel(sqlalchemy_level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _json_stream(level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level=level, json=True, stream=stream)
    return stream


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _assert_clean(output: str, *secrets: str) -> None:
    leaked = [secret for secret in secrets if secret in output]
    assert not leaked, f"leaked {leaked} in:\n{output}"


def _fail_with_local(refresh_token: str) -> None:
    kept_in_frame = refresh_token.upper()
    raise RuntimeError(f"refresh failed for generation {len(kept_in_frame)}")


# --- configure_logging, JSON mode -----------------------------------------------------------


def test_every_json_line_parses_and_leads_with_standard_keys() -> None:
    """Each line is one JSON object starting timestamp, level, logger, event, then bound fields."""
    stream = _json_stream()
    log = get_logger("broker.refresher").bind(provider="netid")
    log.info("refreshed", user="alice", generation=3)
    log.warning("slow idp", elapsed_s=4.5)

    records = _records(stream)
    assert len(records) == 2
    assert list(records[0])[:4] == ["timestamp", "level", "logger", "event"]
    assert records[0]["level"] == "info"
    assert records[0]["logger"] == "broker.refresher"
    assert records[0]["timestamp"].endswith("Z")
    assert records[0] | {"timestamp": None} == {
        "timestamp": None,
        "level": "info",
        "logger": "broker.refresher",
        "event": "refreshed",
        "provider": "netid",
        "user": "alice",
        "generation": 3,
    }
    assert records[1]["level"] == "warning"


def test_secrets_under_secret_keys_are_redacted_and_identifiers_survive() -> None:
    """Token, secret, code, verifier, password and key fields are redacted; ids stay readable."""
    stream = _json_stream()
    get_logger("broker.idp").info(
        "exchanged",
        access_token=ACCESS,
        refresh_token=REFRESH,
        id_token=ID_TOKEN,
        client_secret=CLIENT_SECRET,
        code=AUTH_CODE,
        code_verifier=VERIFIER,
        password=PASSWORD,
        api_key=API_KEY,
        Authorization=f"Bearer {ACCESS}",
        provider="netid",
        user="alice",
        generation=7,
        key_id="k-2025-01",
        problem="invalid_grant",
    )

    _assert_clean(stream.getvalue(), *ALL_SECRETS)
    (record,) = _records(stream)
    assert record["refresh_token"] == REDACTED
    assert record["code"] == REDACTED
    assert record["Authorization"] == REDACTED
    assert (record["provider"], record["user"], record["generation"]) == ("netid", "alice", 7)
    assert (record["key_id"], record["problem"]) == ("k-2025-01", "invalid_grant")


def test_secrets_inside_the_message_are_redacted() -> None:
    """Bearer headers, JWTs, query fields and JSON pairs in the event text are redacted."""
    stream = _json_stream()
    get_logger().info(
        f"POST /token code={AUTH_CODE}&code_verifier={VERIFIER} Authorization: Bearer {ACCESS} "
        f'id={JWT} body {{"refresh_token": "{REFRESH}"}} for provider netid'
    )

    _assert_clean(stream.getvalue(), *ALL_SECRETS, JWT)
    (record,) = _records(stream)
    assert record["event"].startswith(f"POST /token code={REDACTED}&code_verifier={REDACTED}")
    assert "for provider netid" in record["event"]


def test_secrets_in_nested_containers_are_redacted() -> None:
    """Secrets nested in dicts, lists and tuples under harmless keys are still redacted."""
    stream = _json_stream()
    get_logger().info(
        "idp response",
        body={"token_type": "Bearer", "tokens": {"access_token": ACCESS}, "expires_in": 3600},
        history=[
            {"refresh_token": REFRESH, "generation": 2},
            ("note", f"client_secret={CLIENT_SECRET}"),
        ],
    )

    _assert_clean(stream.getvalue(), ACCESS, REFRESH, CLIENT_SECRET)
    (record,) = _records(stream)
    assert record["body"] == {"token_type": "Bearer", "tokens": REDACTED, "expires_in": 3600}
    assert record["history"][0] == {"refresh_token": REDACTED, "generation": 2}


def test_secret_instances_are_redacted_wherever_they_appear() -> None:
    """A Secret is redacted as a value, inside containers, and inside a dataclass repr."""
    stream = _json_stream()
    get_logger().info(
        "stored",
        value=Secret(REFRESH),
        pair=[Secret(ACCESS), "visible"],
        token_set=TokenSet(refresh_token=Secret(ID_TOKEN)),
    )

    _assert_clean(stream.getvalue(), REFRESH, ACCESS, ID_TOKEN)
    (record,) = _records(stream)
    assert record["value"] == REDACTED
    assert record["pair"] == [REDACTED, "visible"]


def test_bound_context_variables_are_redacted() -> None:
    """Fields bound through structlog.contextvars pass through the same redaction."""
    stream = _json_stream()
    structlog.contextvars.bind_contextvars(refresh_token=REFRESH, request_id="req-1")
    get_logger().info("handling")

    _assert_clean(stream.getvalue(), REFRESH)
    assert _records(stream)[0]["request_id"] == "req-1"


def test_exception_messages_are_redacted() -> None:
    """A token inside an exception message logged with log.exception never reaches the output."""
    stream = _json_stream()
    log = get_logger("broker.idp")
    try:
        raise ValueError(f'token endpoint said {{"refresh_token": "{REFRESH}"}} code={AUTH_CODE}')
    except ValueError:
        log.exception("refresh failed", provider="netid")

    _assert_clean(stream.getvalue(), REFRESH, AUTH_CODE)
    (record,) = _records(stream)
    assert record["level"] == "error"
    assert record["exception"][0]["exc_type"] == "ValueError"
    assert "token endpoint said" in record["exception"][0]["exc_value"]


def test_tracebacks_carry_no_local_variables() -> None:
    """A secret held only in a local variable of the raising frame is absent from the output."""
    stream = _json_stream()
    try:
        _fail_with_local(LOCAL_SECRET)
    except RuntimeError:
        get_logger().exception("refresh failed")

    output = stream.getvalue()
    _assert_clean(output, LOCAL_SECRET, LOCAL_SECRET.upper())
    frames = _records(stream)[0]["exception"][0]["frames"]
    assert frames[-1]["name"] == "_fail_with_local"
    assert all("locals" not in frame for frame in frames)


def test_stdlib_access_log_is_redacted_and_rendered_as_json() -> None:
    """aiohttp's access log goes through the same processors: JSON, named, code redacted."""
    stream = _json_stream()
    logging.getLogger("aiohttp.access").info("GET /oauth-callback/?code=XYZ&state=abc")

    _assert_clean(stream.getvalue(), "XYZ")
    (record,) = _records(stream)
    assert record["event"] == f"GET /oauth-callback/?code={REDACTED}&state=abc"
    assert (record["logger"], record["level"]) == ("aiohttp.access", "info")
    assert "timestamp" in record


def test_stdlib_exceptions_are_redacted_without_locals() -> None:
    """An exception logged through stdlib (asyncio) is rendered as a dict, redacted, no locals."""
    stream = _json_stream()
    try:
        _fail_with_local(LOCAL_SECRET)
    except RuntimeError as exc:
        exc.add_note(f"Authorization: Bearer {ACCESS}")
        logging.getLogger("asyncio").exception("task failed for %s", f"password={PASSWORD}")

    _assert_clean(stream.getvalue(), LOCAL_SECRET, LOCAL_SECRET.upper(), ACCESS, PASSWORD)
    (record,) = _records(stream)
    assert record["event"] == f"task failed for password={REDACTED}"
    assert record["exception"][0]["exc_notes"] == [f"Authorization: Bearer {REDACTED}"]


# --- configure_logging, console mode and options -------------------------------------------


def test_console_mode_redacts_fields_messages_and_tracebacks() -> None:
    """The console renderer gets the same redacted event, and its traceback shows no locals."""
    stream = io.StringIO()
    configure_logging(json=False, stream=stream)
    log = get_logger("broker.cli")
    log.info(f"callback code={AUTH_CODE}", refresh_token=REFRESH, provider="netid")
    logging.getLogger("aiohttp.access").info("GET /oauth-callback/?code=XYZ&state=abc")
    try:
        _fail_with_local(LOCAL_SECRET)
    except RuntimeError as exc:
        exc.add_note(f"id_token={ID_TOKEN}")
        log.exception("refresh failed")

    output = stream.getvalue()
    _assert_clean(output, AUTH_CODE, REFRESH, "XYZ", ID_TOKEN, LOCAL_SECRET, LOCAL_SECRET.upper())
    assert "provider=netid" in output
    assert "Traceback (most recent call last)" in output
    assert "_fail_with_local" in output
    assert not output.lstrip().startswith("{")


def test_json_is_the_default_when_the_stream_is_not_a_tty() -> None:
    """With json=None a non-TTY stream (journald, a pipe) gets JSON lines."""
    stream = io.StringIO()
    configure_logging(stream=stream)
    get_logger().info("started", refresh_token=REFRESH)

    assert _records(stream)[0]["event"] == "started"
    _assert_clean(stream.getvalue(), REFRESH)


def test_console_is_the_default_on_a_tty() -> None:
    """With json=None a TTY stream gets the human console renderer, still redacted."""
    stream = _FakeTTY()
    configure_logging(stream=stream)
    get_logger().info("started", refresh_token=REFRESH)

    output = stream.getvalue()
    assert "started" in output
    assert not output.lstrip().startswith("{")
    _assert_clean(output, REFRESH)


def test_configuring_twice_installs_one_handler() -> None:
    """A second configure_logging replaces the first handler instead of duplicating output."""
    root = logging.getLogger()
    first, second = io.StringIO(), io.StringIO()
    configure_logging(json=True, stream=first)
    after_first = len(root.handlers)
    configure_logging(json=True, stream=second)
    get_logger().info("once")
    logging.getLogger("aiohttp.server").info("migrated")

    assert len(root.handlers) == after_first
    assert first.getvalue() == ""
    assert [r["event"] for r in _records(second)] == ["once", "migrated"]


def test_level_filters_structlog_and_stdlib_records() -> None:
    """Records below the configured level are dropped from both structlog and stdlib loggers."""
    stream = _json_stream(level="warning")
    get_logger().info("hidden")
    logging.getLogger("aiohttp.server").info("hidden too")
    get_logger().warning("shown")
    logging.getLogger("aiohttp.server").error("shown too")

    assert [r["event"] for r in _records(stream)] == ["shown", "shown too"]


def test_sqlalchemy_is_held_at_warning() -> None:
    """SQLAlchemy's info chatter is dropped at the default level while its warnings pass."""
    stream = _json_stream(level="debug")
    engine_log = logging.getLogger("sqlalchemy.engine.Engine")
    engine_log.info("SELECT 1")
    engine_log.warning("pool overflow")

    assert [r["event"] for r in _records(stream)] == ["pool overflow"]


def test_unknown_level_is_rejected() -> None:
    """A misspelt level fails loudly instead of logging at an unexpected threshold."""
    with pytest.raises(ValueError, match="verbose"):
        configure_logging(level="verbose", stream=io.StringIO())


# --- redact as a pure processor ----------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "secret",
        "client_secret",
        "code",
        "code_verifier",
        "verifier",
        "authorization",
        "Authorization",
        "password",
        "cookie",
        "Set-Cookie",
        "key",
        "keys",
        "private_key",
        "api_key",
        "X-Api-Key",
        "accessToken",
        "authorization_code",
        "csrf_token",
    ],
)
def test_redact_replaces_values_of_secret_keys(key: str) -> None:
    """Keys that name a secret (case- and separator-insensitive) have their value replaced."""
    assert redact(None, "info", {key: "s3cr3t-value"}) == {key: REDACTED}


@pytest.mark.parametrize(
    "key",
    [
        "event",
        "level",
        "timestamp",
        "logger",
        "grant",
        "provider",
        "user",
        "problem",
        "generation",
        "key_id",
        "token_type",
        "status_code",
        "token_endpoint",
        "expires_in",
        "monkey",
    ],
)
def test_redact_keeps_structural_and_identifier_keys(key: str) -> None:
    """Structural keys and identifiers that merely contain a secret word stay readable."""
    assert redact(None, "info", {key: "plain-value"}) == {key: "plain-value"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.DEF-123_~+/=", f"Authorization: Bearer {REDACTED}"),
        ("authorization: bearer abc123", f"authorization: bearer {REDACTED}"),
        (f"jwt {JWT} end", f"jwt {REDACTED} end"),
        ("a.b?refresh_token=r1&state=s", f"a.b?refresh_token={REDACTED}&state=s"),
        ("code=c1 next", f"code={REDACTED} next"),
        (
            "redirect=https%3A%2F%2Fx%2F%3Fcode%3Dc1",
            f"redirect=https%3A%2F%2Fx%2F%3Fcode%3D{REDACTED}",
        ),
        ("'password=p1'", f"'password={REDACTED}'"),
        ("status_code=400 token_type=Bearer", "status_code=400 token_type=Bearer"),
        (
            '{"id_token": "a\\"b", "scope": "openid"}',
            f'{{"id_token": "{REDACTED}", "scope": "openid"}}',
        ),
        (
            "{'access_token': 'a1', 'expires_in': 3600}",
            f"{{'access_token': '{REDACTED}', 'expires_in': 3600}}",
        ),
        (
            r'"{\"refresh_token\": \"r1\", \"x\": 1}"',
            rf'"{{\"refresh_token\": \"{REDACTED}\", \"x\": 1}}"',
        ),
        ("grant netid/alice at generation 4", "grant netid/alice at generation 4"),
    ],
)
def test_redact_scans_string_values_for_token_patterns(text: str, expected: str) -> None:
    """Bearer headers, JWTs, form fields and JSON pairs inside any string value are redacted."""
    assert redact(None, "info", {"event": text}) == {"event": expected}


@pytest.mark.parametrize(
    "text",
    [
        "Bearer\tabc123",  # whitespace other than a space
        "x=1&access_token=a1",  # no whitespace, no quote: only "="
        "https%3A%2F%2Fx%2F%3Fcode%3dc1",  # only an encoded "="
        '{"refresh_token":"r1"}',  # no whitespace, no "=": only quotes
        JWT,  # nothing but the JWT
    ],
)
def test_strings_with_a_single_kind_of_marker_are_still_scanned(text: str) -> None:
    """The quick check that skips plain strings lets through each thing a pattern needs."""
    assert REDACTED in _scrub(text)


# Fragments the value patterns care about, and filler around them.
_FRAGMENTS = st.sampled_from(
    [
        "Bearer",
        "bearer",
        "Basic",
        "DPoP",
        " ",
        "\t",
        "\u00a0",
        "=",
        "%3D",
        "%3d",
        "%3F",
        "%26",
        "&",
        "?",
        '"',
        "'",
        "\\",
        ":",
        "eyJ",
        "abc",
        "_-",
        ".",
        "token",
        "code",
        "refresh_token",
        "access_token",
        "password",
        "client_secret",
        "status_code",
        "x",
        # whole secrets, in each form a pattern knows
        '"id_token":"i1"',
        "'code':'c1'",
        '\\"refresh_token\\":\\"r1\\"',
        "password=p1",
        "code%3Dc1",
        "Bearer\u2003b1",
        "eyJa.eyJb.c",
        "DPoP\nd1",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=12).map("".join))
def test_the_quick_check_never_skips_a_string_a_pattern_would_change(text: str) -> None:
    """Skipping the patterns for strings without any marker changes no outcome."""
    assert _scrub(text) == _apply_patterns(text)


def test_redact_replaces_long_bytes_but_keeps_short_ones() -> None:
    """Bytes longer than 16 (sealed blobs, keys) are replaced; short ones pass through."""
    result = redact(None, "info", {"blob": b"\x00" * 17, "nonce": b"\x01" * 16})
    assert result == {"blob": "[REDACTED bytes]", "nonce": b"\x01" * 16}


def test_redact_keeps_none_and_booleans_under_secret_keys() -> None:
    """Whether a secret exists is useful and carries no secret, so None and bools survive."""
    result = redact(None, "info", {"refresh_token": None, "has_token": True, "access_token": 0})
    assert result == {"refresh_token": None, "has_token": True, "access_token": REDACTED}


def test_redact_does_not_mutate_its_input() -> None:
    """The caller's event dict and the containers inside it are left untouched."""
    nested = {"refresh_token": REFRESH}
    items = [Secret(ACCESS), f"code={AUTH_CODE}"]
    event = {"event": "x", "body": nested, "items": items, "pair": ("Bearer abc", 1)}

    result = redact(None, "info", event)

    assert event == {"event": "x", "body": nested, "items": items, "pair": ("Bearer abc", 1)}
    assert nested == {"refresh_token": REFRESH}
    assert items[1] == f"code={AUTH_CODE}"
    assert result == {
        "event": "x",
        "body": {"refresh_token": REDACTED},
        "items": [REDACTED, f"code={REDACTED}"],
        "pair": (f"Bearer {REDACTED}", 1),
    }


def test_redact_scans_the_repr_of_unknown_objects() -> None:
    """Objects the renderer would repr() are scanned as that repr, so their tokens are caught."""

    class Response:
        def __repr__(self) -> str:
            return f"<Response body=access_token={ACCESS}>"

    assert redact(None, "info", {"response": Response()}) == {
        "response": f"<Response body=access_token={REDACTED}>"
    }


def test_redact_survives_self_referencing_containers() -> None:
    """A dict that contains itself is cut off at a depth limit instead of recursing forever."""
    loop: dict[str, Any] = {"provider": "netid"}
    loop["self"] = loop

    result = redact(None, "info", {"loop": loop})

    depth, node = 0, result["loop"]
    while isinstance(node, dict):
        depth, node = depth + 1, node["self"]
    assert node == REDACTED
    assert depth > 10


def test_redact_leaves_processor_formatter_metadata_alone() -> None:
    """The LogRecord that ProcessorFormatter threads through the pre-chain stays a LogRecord."""
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", (), None)
    result = redact(None, "info", {"event": "e", "_record": record, "_from_structlog": False})
    assert result["_record"] is record
    assert result["_from_structlog"] is False
