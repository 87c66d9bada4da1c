"""UTCDateTime's own SQLite processors write and read exactly what SQLAlchemy's DATETIME does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite import DATETIME

from broker.store.tables import UTCDateTime

DIALECT = sqlite.dialect()
MINE_IN = UTCDateTime().bind_processor(DIALECT)
MINE_OUT = UTCDateTime().result_processor(DIALECT, None)
THEIRS_IN = DATETIME().bind_processor(DIALECT)  # type: ignore[no-untyped-call]
THEIRS_OUT = DATETIME().result_processor(DIALECT, None)  # type: ignore[no-untyped-call]

moments = st.datetimes(
    min_value=datetime(1970, 1, 2),  # noqa: DTZ001 - zones are added by the strategy
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    ),
)


@given(moments)
def test_a_moment_is_written_as_sqlalchemy_writes_it_and_read_back_equal(moment: datetime) -> None:
    """Same text as DATETIME's (so ordering and comparisons in SQL agree), same instant back."""
    assert MINE_IN is not None
    assert THEIRS_IN is not None
    assert MINE_OUT is not None
    text = MINE_IN(moment)
    assert text == THEIRS_IN(moment.astimezone(UTC).replace(tzinfo=None))
    back = MINE_OUT(text)
    assert back == moment
    assert back.tzinfo is UTC


def test_text_in_other_shapes_still_reads() -> None:
    """Text without fractions, or naming a zone, goes the general way and comes back in UTC."""
    assert MINE_OUT is not None
    assert MINE_OUT("2026-12-06 15:00:00") == datetime(2026, 12, 6, 15, tzinfo=UTC)
    assert MINE_OUT(None) is None


def test_a_naive_moment_is_refused() -> None:
    """The store takes aware datetimes only."""
    assert MINE_IN is not None
    with pytest.raises(ValueError, match="naive"):
        MINE_IN(datetime(2026, 12, 6))  # noqa: DTZ001 - the point of the test


def test_a_naive_moment_is_refused_after_the_same_aware_moment_was_written() -> None:
    """The texts kept for repeated instants never answer for a naive datetime."""
    assert MINE_IN is not None
    aware = datetime(2026, 12, 6, 15, tzinfo=UTC)
    assert MINE_IN(aware) == "2026-12-06 15:00:00.000000"
    with pytest.raises(ValueError, match="naive"):
        MINE_IN(aware.replace(tzinfo=None))


@settings(max_examples=10, deadline=None)
@given(st.lists(moments, min_size=300, max_size=400))
def test_many_moments_in_a_row_each_get_their_own_text(batch: list[datetime]) -> None:
    """More distinct instants than are kept, repeated and in zones: each written as DATETIME
    writes its UTC value."""
    assert MINE_IN is not None
    assert THEIRS_IN is not None
    for moment in batch + batch[::-1]:
        assert MINE_IN(moment) == THEIRS_IN(moment.astimezone(UTC).replace(tzinfo=None))
