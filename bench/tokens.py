"""The benchmarks' fake token values, and the check that none of them reached a daemon's log.

Every refresh and access token a benchmark seeds, imports or issues from its fake provider
starts with `PREFIX`, so one search of a daemon's log finds any that leaked. The values are
random and live only in the benchmark's temporary store; they are never printed.
"""

from __future__ import annotations

import secrets
from pathlib import Path

PREFIX = "tbbench."


def fake_token() -> str:
    """A random token-shaped value (43 characters after the prefix, like a real one)."""
    return PREFIX + secrets.token_urlsafe(32)


def assert_no_tokens_in(log: Path) -> None:
    """Fail loudly if a benchmark token appears in `log`."""
    if log.exists() and PREFIX in log.read_text(errors="replace"):
        raise RuntimeError(f"a benchmark token value appears in {log}: the daemon leaked it")
