"""Reading one TOML table with typed getters that record problems instead of raising.

A getter returns None (or the given default) when a key is absent or its value has the wrong
type, so parsing carries on and every mistake in a file is reported together, each under its
full key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION_RE = re.compile(r"(?:\d+(?:ms|s|m|h|d))+", re.ASCII)
_DURATION_PART_RE = re.compile(r"(\d+)(ms|s|m|h|d)", re.ASCII)
_TOML_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is a subclass of int
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
)


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as "90s", "15m", "10h", "1d", "500ms" or "1h30m"."""
    if _DURATION_RE.fullmatch(text):
        try:
            ms = sum(int(n) * _DURATION_MS[unit] for n, unit in _DURATION_PART_RE.findall(text))
            return timedelta(milliseconds=ms)
        except OverflowError:
            raise ValueError(f"duration {text!r} is too large") from None
    hint = f'; write "{text.strip()}s" for seconds' if text.strip().isdigit() else ""
    raise ValueError(
        f"invalid duration {text!r}: expected whole numbers with units ms, s, m, h or d,"
        f' such as "30s", "15m" or "1h30m"{hint}'
    )


class Table:
    """One TOML table being read, at a dotted key path, into a shared problem list."""

    def __init__(
        self, data: Mapping[str, Any], path: str, problems: list[str], keys: Iterable[str]
    ) -> None:
        self.data, self.prefix, self.problems = data, path, problems
        known = list(keys)
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                self.problem(
                    key, "unknown key" + (f' (did you mean "{close[0]}"?)' if close else "")
                )

    def where(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {message}")

    def _get(self, key: str, types: tuple[type, ...], expected: str) -> Any:
        value = self.data.get(key)
        # bool is a subclass of int: `jitter = true` must not read as 1.
        is_bool_number = isinstance(value, bool) and bool not in types
        if value is not None and (not isinstance(value, types) or is_bool_number):
            self.problem(key, f"expected {expected}, got {type_name(value)}")
            return None
        return value

    def string(self, key: str, expected: str = "a string") -> str | None:
        return cast("str | None", self._get(key, (str,), expected))

    def nonempty(self, key: str, *, required: bool = False) -> str | None:
        value = self.string(key)
        if value == "" or (value is None and required and key not in self.data):
            self.problem(key, "must not be empty" if value == "" else "required")
            return None
        return value

    def number(self, key: str, default: float) -> float:
        value = self._get(key, (int, float), "a number")
        return default if value is None else float(value)

    def integer(self, key: str) -> int | None:
        return cast("int | None", self._get(key, (int,), "an integer"))

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, (bool,), "true or false")
        return default if value is None else bool(value)

    def strings(self, key: str) -> tuple[str, ...] | None:
        items = self._get(key, (list,), "an array of strings")
        if items is None:
            return None
        for i, item in enumerate(items):
            if not isinstance(item, str):
                self.problem(f"{key}[{i}]", f"expected a string, got {type_name(item)}")
        return tuple(item for item in items if isinstance(item, str))

    def duration(self, key: str, default: timedelta) -> timedelta:
        value = self._get(key, (str,), 'a duration string such as "30s"')
        try:
            return default if value is None else parse_duration(value)
        except ValueError as e:
            self.problem(key, str(e))
            return default

    def path(self, key: str, base_dir: Path) -> Path | None:
        value = self.nonempty(key)
        return None if value is None else base_dir / value

    def array(self, key: str, expected: str) -> list[Any]:
        return cast("list[Any]", self._get(key, (list,), expected) or [])

    def table(self, key: str) -> Mapping[str, Any]:
        return cast("Mapping[str, Any]", self._get(key, (dict,), "a table") or {})

    def section(self, key: str, cls: type) -> Table:
        return Table(self.table(key), self.where(key), self.problems, table_keys(cls))


def table_keys(cls: type, exclude: str = "") -> list[str]:
    # The TOML keys of a section are exactly the field names of its dataclass.
    return [f.name for f in dataclasses.fields(cls) if f.name != exclude]


def type_name(value: object) -> str:
    return next((n for t, n in _TOML_TYPE_NAMES if isinstance(value, t)), type(value).__name__)
