"""Structured logging for a daemon under systemd, with every secret redacted before rendering.

One processor chain serves both structlog and the standard library (aiohttp, alembic,
sqlalchemy, asyncio log through `logging`), so a record from any of them is redacted and
rendered the same way: JSON lines for journald, or structlog's console renderer on a TTY.

Redaction (ROTATION.md invariant 8) runs after exceptions are rendered into the event dict, so
exception messages are scanned too. It works on keys and on values:

- a key is secret when it is `code`, `auth_code` or `authorization_code`, or when its last
  word is token(s), secret(s), password, passphrase, verifier, authorization, cookie(s),
  credential(s) or key(s); `accessToken` and `X-Api-Key` are normalised to words first. `code`
  is always redacted because OAuth authorization codes travel under that name, so log a
  problem code under the key `problem`. Identifiers stay readable: `key_id`, `token_type`,
  `status_code`, `token_endpoint`.
- every string is scanned for `Bearer <token>`, JWTs, `name=value` form fields and
  `"name": "value"` pairs; `Secret` instances and bytes longer than 16 are replaced.

Tracebacks are rendered without local variables: a refresh token in a local must not reach
the journal because something raised next to it.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from broker.model import Secret

__all__ = ["REDACTED", "configure_logging", "get_logger", "redact"]

REDACTED = "[REDACTED]"
REDACTED_BYTES = "[REDACTED bytes]"

# Longer byte strings are sealed envelopes or key material; short ones are nonces or flags.
_MAX_CLEAR_BYTES = 16
# Deeper than this is a cycle or a data dump; neither belongs in a log line.
_MAX_DEPTH = 32
_HANDLER_NAME = "token-broker"
# Added by ProcessorFormatter for foreign records and removed before rendering; the pre-chain
# still needs the real LogRecord under `_record`.
_META_KEYS = frozenset({"_record", "_from_structlog"})
_JSON_LEAD_KEYS = ("timestamp", "level", "logger", "event")
# alembic narrates every step at INFO; the daemon logs its own store_migrated event instead.
_STDLIB_LEVELS = {"sqlalchemy": logging.WARNING, "alembic": logging.WARNING}

_SECRET_KEYS = frozenset({"code", "auth_code", "authorization_code"})
_SECRET_LAST_WORDS = frozenset(
    {
        "token",
        "tokens",
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "verifier",
        "authorization",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "key",
        "keys",
    }
)
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

_FIELD_NAMES = (
    r"(?:access_|refresh_|id_|subject_|actor_|device_)?token|code|code_verifier"
    r"|client_secret|client_assertion|assertion|password|api_key"
)
_B64 = r"[A-Za-z0-9_-]"
# (pattern, replacement) pairs applied in order to every string value.
_VALUE_PATTERNS = (
    (re.compile(r"\b((?i:bearer)|Basic|DPoP)\s+[A-Za-z0-9\-._~+/]+=*"), rf"\1 {REDACTED}"),
    # JWS has three segments and JWE five; the signature of an unsigned JWT is empty.
    (re.compile(rf"\beyJ{_B64}+(?:\.{_B64}*){{2,4}}"), REDACTED),
    # `(?<!\w)` rather than `\b` so `status_code=` is not taken for `code=`; the `%3F`, `%26`
    # and `%3D` forms catch a query string nested in an encoded redirect URI.
    (
        re.compile(rf"(?i)(?:(?<!\w)|(?<=%3F)|(?<=%26))({_FIELD_NAMES})(=|%3D)[^&\s\"'<>;,)]+"),
        rf"\1\2{REDACTED}",
    ),
    # JSON bodies and Python reprs of dicts, as they appear in IdP error messages; the optional
    # backslash catches a JSON body quoted again inside a JSON string.
    (
        re.compile(rf"(?i)(\\?[\"'])({_FIELD_NAMES})\1(\s*:\s*)(\\?[\"'])(?:(?!\4)(?:\\.|.))*\4"),
        rf"\1\2\1\3\4{REDACTED}\4",
    ),
)


# Every value pattern needs one of these to match: whitespace (Bearer), `eyJ` (JWT), `=` or
# `%3D` (form fields), a quote (JSON pairs). One search finds the strings that have none, most
# of those a daemon logs (names, outcomes, timestamps), and spares them the four patterns.
_MAY_MATCH = re.compile(r"""[\s="']|eyJ|%3[dD]""")


@functools.lru_cache(maxsize=1024)
def _is_secret_key(key: str) -> bool:
    # Cached: a daemon logs the same few dozen keys over and over.
    words = _CAMEL_BOUNDARY.sub("_", key).lower().replace("-", "_")
    return words in _SECRET_KEYS or words.rsplit("_", 1)[-1] in _SECRET_LAST_WORDS


def _apply_patterns(text: str) -> str:
    for pattern, replacement in _VALUE_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _scrub(text: str) -> str:
    return _apply_patterns(text) if _MAY_MATCH.search(text) else text


# Exact types whose values carry no text to scan: most of what a daemon logs, with strings.
_NUMBERS = frozenset({int, float, bool, type(None)})


def _redact_value(value: object, depth: int) -> object:
    if depth > _MAX_DEPTH or isinstance(value, Secret):
        return REDACTED
    if isinstance(value, bytes | bytearray) and len(value) > _MAX_CLEAR_BYTES:
        return REDACTED_BYTES
    if value is None or isinstance(value, bool | int | float | bytes | bytearray):
        return value
    if isinstance(value, Mapping):
        return _redact_mapping(value, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        items = [_redact_value(item, depth + 1) for item in value]
        return items if isinstance(value, list) else type(value)(items)
    # Renderers fall back to repr() for anything else, so scan what they would print.
    return _scrub(value if isinstance(value, str) else repr(value))


def _redact_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
    clean: dict[Any, Any] = {}
    for key, value in mapping.items():
        if isinstance(key, str) and _is_secret_key(key):
            # None and booleans say whether a secret exists without carrying one.
            clean[key] = value if value is None or isinstance(value, bool) else REDACTED
        elif depth > _MAX_DEPTH:
            clean[key] = REDACTED
        # The common cases by exact type, as `_redact_value` would treat them (a subclass of
        # str or int goes the whole way there).
        elif type(value) is str:
            clean[key] = _scrub(value)
        elif type(value) in _NUMBERS:
            clean[key] = value
        else:
            clean[key] = _redact_value(value, depth)
    return clean


def redact(
    logger: object,  # noqa: ARG001 - the structlog processor signature
    method_name: str,  # noqa: ARG001 - the structlog processor signature
    event_dict: MutableMapping[str, Any],
) -> MutableMapping[str, Any]:
    """A copy of `event_dict` with every secret, at any depth, replaced by `REDACTED`."""
    # A copy, because nested values are often the caller's own dicts and lists.
    meta = {key: event_dict[key] for key in _META_KEYS if key in event_dict}
    rest = {key: value for key, value in event_dict.items() if key not in _META_KEYS}
    return _redact_mapping(rest, depth=0) | meta


def _lead_with_standard_keys(
    _logger: object, _method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # journalctl -o cat shows the raw line; fixed leading keys make it scannable by eye.
    lead = {key: event_dict[key] for key in _JSON_LEAD_KEYS if key in event_dict}
    return lead | {key: value for key, value in event_dict.items() if key not in lead}


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _parse_level(level: str) -> int:
    levels = logging.getLevelNamesMapping()
    try:
        return levels[level.upper()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}") from None


def configure_logging(
    *, level: str = "info", json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging through one redacting chain to `stream`."""
    numeric_level = _parse_level(level)
    out = sys.stderr if stream is None else stream
    tty = _is_tty(out)
    as_json = not tty if json is None else json

    exception_renderer: structlog.types.Processor
    renderer: structlog.types.Processor
    if as_json:
        transformer = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        exception_renderer = structlog.processors.ExceptionRenderer(transformer)
        renderer = structlog.processors.JSONRenderer()
    else:
        # A plain traceback string, not Rich: Rich wraps long lines at the terminal width and
        # colours them, which can split a token so the value patterns miss its tail.
        exception_renderer = structlog.processors.format_exc_info
        renderer = structlog.dev.ConsoleRenderer(
            colors=tty, exception_formatter=structlog.dev.plain_traceback
        )

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        exception_renderer,
        redact,
    ]
    structlog.configure(
        # Redacting here, before stdlib sees the record, keeps other handlers (pytest's
        # capture, a library's own) from receiving a secret.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers must follow a later reconfiguration (tests, `--log-level`).
        cache_logger_on_first_use=False,
    )

    final: list[structlog.types.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta
    ]
    if as_json:
        final.append(_lead_with_standard_keys)
    final.append(renderer)
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    )

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name, floor in _STDLIB_LEVELS.items():
        logging.getLogger(name).setLevel(max(floor, numeric_level))


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger named `name`, or after the calling module when omitted."""
    if name is None:
        return structlog.stdlib.get_logger()
    return structlog.stdlib.get_logger(name)
