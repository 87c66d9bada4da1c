"""The schema, in SQLAlchemy Core; Alembic migrations must produce exactly this."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import false
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)
_from_iso = datetime.fromisoformat


# Datetime texts a SQLite bind processor keeps (see UTCDateTime.bind_processor).
_BIND_TEXTS = 256


def _in_utc(value: datetime) -> datetime:
    """`value` in UTC; a naive datetime is refused (its zone would be a guess)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store; pass an aware UTC datetime")
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _in_utc(value)
        # SQLite keeps text; dropping the zone keeps its ordering lexicographic and uniform.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        # The text SQLAlchemy's SQLite DATETIME writes ("YYYY-MM-DD HH:MM:SS.ffffff", UTC),
        # made in one step: imports and group commits bind thousands of these at once, most
        # of them the same few instants (a batch's `now`, its expiries), so the last texts are
        # kept (keyed by the instant: equal aware datetimes are the same UTC text).
        texts: dict[datetime, str] = {}

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            text = texts.get(value)
            if text is None:
                text = _in_utc(value).isoformat(" ", "microseconds")[:-6]  # no "+00:00"
                if len(texts) >= _BIND_TEXTS:
                    texts.clear()
                texts[value] = text
            return text

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        # SQLite keeps ISO 8601 text in UTC without a zone (see above): one C call parses it,
        # which matters when 100,000 grants are loaded at start. Text that already names a
        # zone, or is not ISO 8601, goes the general way.
        general = super().result_processor(dialect, coltype)

        def process(value: Any) -> datetime | None:
            if value is None:
                return None
            try:
                return _from_iso(value + "+00:00")  # naive UTC text made aware in one call
            except (TypeError, ValueError):
                return general(value) if general is not None else value

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Columns holding AES-GCM envelopes; their associated data binds (table, row id, column).
GRANT_SEALED_COLUMNS = ("refresh_token", "access_token", "id_token", "claims")

grants = Table(
    "grants",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("provider", String(64), nullable=False),
    Column("user_name", String(128), nullable=False),
    Column("sub", String(255), nullable=True),
    Column("state", String(32), nullable=False),
    Column("scopes", Text, nullable=False, server_default=""),
    Column("token_type", String(32), nullable=False, server_default="Bearer"),
    Column("refresh_token", LargeBinary, nullable=True),
    Column("access_token", LargeBinary, nullable=True),
    Column("id_token", LargeBinary, nullable=True),
    Column("claims", LargeBinary, nullable=True),
    Column("key_id", String(64), nullable=True),
    Column("access_expires_at", UTCDateTime, nullable=True),
    Column("next_refresh_at", UTCDateTime, nullable=True),
    Column("generation", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The refresher's bookkeeping (migration 0003): when the access token was issued, how many
    # transient failures in a row, the durable intent record, and the ownership lease.
    Column("access_issued_at", UTCDateTime, nullable=True),
    Column("refresh_failures", Integer, nullable=False, server_default="0"),
    Column("intent_at", UTCDateTime, nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    # The change sequence value of the row's last visible write (migration 0004): what orders
    # two writes of one row, and what other processes follow the store by.
    Column("version", BigInteger, nullable=False, server_default="0"),
    # The write id of the last commit or settle of a refresh: a retry whose first attempt
    # failed without knowing whether it landed recognises its own write by it.
    Column("last_write", String(32), nullable=True),
    UniqueConstraint("provider", "user_name"),
    Index(None, "next_refresh_at"),
    Index(None, "key_id"),
    Index(None, "updated_at"),
    Index(None, "version"),
    Index(None, "lease_owner"),
)

# One row (id 1): the last value of the change sequence. A write takes its values with
# `UPDATE ... SET seq = seq + n RETURNING seq`, whose row lock is held until that transaction
# commits, so values are handed out in commit order (a poller never misses a late commit).
grant_changes = Table(
    "grant_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
)

# A deleted grant's last word in the change sequence: followers drop it from their caches.
grant_deletions = Table(
    "grant_deletions",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("grant_id", String(32), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("user_name", String(128), nullable=False),
    Column("deleted_at", UTCDateTime, nullable=False),
)

# Logins in progress. The state is kept only as its SHA-256; nonce and PKCE verifier are sealed
# and erased once the login finishes. A device login (RFC 8628, migration 0006) has no state:
# the provider's answer, device code included, is sealed in `device` and erased the same way.
logins = Table(
    "logins",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("provider", String(64), nullable=False),
    Column("user_name", String(128), nullable=False),
    Column("state_hash", String(64), nullable=True, unique=True),
    Column("nonce", LargeBinary, nullable=True),
    Column("code_verifier", LargeBinary, nullable=True),
    Column("key_id", String(64), nullable=True),
    Column("force", Boolean, nullable=False, server_default=false()),
    Column("status", String(16), nullable=False),
    Column("error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("method", String(16), nullable=False, server_default="code"),
    Column("device", LargeBinary, nullable=True),
    Index(None, "expires_at"),
)

# The brokers sharing the store (migration 0005): a random id made at start, where it runs, and
# a heartbeat stamped with the database server's clock. Leases name these ids.
nodes = Table(
    "nodes",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("boot_id", String(64), nullable=False),
    Column("pid_namespace", String(64), nullable=False),
    Column("version", String(32), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    Column("stopped_at", UTCDateTime, nullable=True),
)


class Unindexed(ColumnElement[Any]):
    """A column that SQLite's planner may not serve by an index (SQLite's unary `+`; other
    databases get the plain column).

    Without statistics, SQLite prefers an equality on an index's leading column over any other
    way in: `provider = ?` takes the (provider, user_name) index and so walks every grant of
    the provider, even where a primary-key lookup or a walk of the few leased rows would do.
    """

    inherit_cache = True
    # For the statement cache's key (SQLAlchemy declares it per instance).
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(Unindexed)
def _unindexed(element: Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(Unindexed, "sqlite")
def _unindexed_sqlite(element: Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)
