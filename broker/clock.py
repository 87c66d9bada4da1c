"""The daemon's clock: UTC time that never steps (ROTATION.md invariant 9, "clocks lie").

Every decision the broker makes about time (is this token still alive, when is the next
refresh, has the grace passed) compares instants that this clock produced, often minutes
apart. If the host's wall clock steps (an operator sets it, NTP corrects a large error, a VM
resumes), comparing an instant from before the step with one after it is off by the step: a
step back of ten minutes makes every token look ten minutes younger than it is, and the broker
would serve tokens the provider has already expired.

`SteadyClock` is anchored to a reference clock (the wall clock, or in a fleet the database
server's clock) when it starts, advances with the monotonic clock, which never steps, and
follows the reference only gradually: by at most `slew` seconds per second (0.05%, what NTP
itself allows), so durations measured with it are right to that precision whatever the wall
clock does. A step of the reference larger than `step_threshold` is reported once through
`on_step`, with its size, so an operator sees it in the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

SLEW = 0.0005  # seconds of correction per second at most
STEP_THRESHOLD = 1.0  # seconds between steady and reference time that count as a step
FRESH = 0.001  # seconds for which one reading answers again (see SteadyClock.__call__)


def utcnow() -> datetime:
    """The host's wall clock, in UTC."""
    return datetime.now(UTC)


class SteadyClock:
    """Wall-clock time that follows `reference` smoothly and never jumps (see the module)."""

    def __init__(
        self,
        reference: Callable[[], datetime] = utcnow,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        slew: float = SLEW,
        step_threshold: float = STEP_THRESHOLD,
        on_step: Callable[[float], None] | None = None,
    ) -> None:
        self._reference = reference
        self._monotonic = monotonic
        self._slew = slew
        self._threshold = step_threshold
        self._on_step = on_step
        self._base = reference()
        self._at = monotonic()
        self._reported = False

    def __call__(self) -> datetime:
        """Now, in UTC: never earlier than any earlier answer, never stepped.

        Within `FRESH` seconds of the last full reading the same instant is answered again:
        a busy token path reads the clock for every request, and no decision the broker takes
        turns on a millisecond.
        """
        mono = self._monotonic()
        if 0.0 <= mono - self._at < FRESH:
            return self._base
        elapsed = max(0.0, mono - self._at)
        steady = self._base + timedelta(seconds=elapsed)
        offset = (self._reference() - steady).total_seconds()
        self._notice(offset)
        limit = self._slew * elapsed
        correction = max(-limit, min(limit, offset))
        self._base, self._at = steady + timedelta(seconds=correction), mono
        return self._base

    def follow(self, reference: Callable[[], datetime]) -> float:
        """Follow another reference from now on, starting from it at once (made at start-up,
        before any decision, e.g. to follow the database server's clock in a fleet); returns
        how far it was from the old one, in seconds."""
        offset = (reference() - self()).total_seconds()
        self._reference = reference
        self._base, self._at = reference(), self._monotonic()
        self._reported = False
        return offset

    def offset(self) -> float:
        """Seconds the reference is ahead of this clock right now (negative: behind)."""
        return (self._reference() - self()).total_seconds()

    def _notice(self, offset: float) -> None:
        if abs(offset) > self._threshold:
            if not self._reported and self._on_step is not None:
                self._on_step(offset)
            self._reported = True
        elif abs(offset) < self._threshold / 2:
            self._reported = False  # caught up: a later step is reported again
