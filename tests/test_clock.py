"""The steady clock: wall-clock time that follows its reference smoothly and never steps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.clock import FRESH, SLEW, SteadyClock

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


class Hands:
    """A reference wall clock and a monotonic clock that the test moves by hand."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 1000.0

    def tick(self, seconds: float) -> None:
        """Real time passes: both clocks move."""
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, seconds: float) -> None:
        """Someone sets the wall clock: only it moves."""
        self.wall += timedelta(seconds=seconds)


def steady(hands: Hands, steps: list[float] | None = None) -> SteadyClock:
    """A steady clock on the hands, reporting steps into `steps`."""
    return SteadyClock(
        lambda: hands.wall,
        monotonic=lambda: hands.mono,
        on_step=None if steps is None else steps.append,
    )


def test_it_starts_at_the_reference_and_keeps_pace_with_it() -> None:
    """Without steps the steady clock reads what the reference reads."""
    hands = Hands()
    clock = steady(hands)
    assert clock() == T0
    hands.tick(3600)
    assert clock() == T0 + timedelta(hours=1)


@pytest.mark.parametrize("step", [-600.0, 600.0, -2.0, 3.5])
def test_a_step_of_the_wall_clock_is_not_a_step_of_the_steady_clock(step: float) -> None:
    """Ten minutes set back (or forward) on the wall moves the steady clock by at most the slew
    over the time that passes, and is reported once with its size."""
    hands = Hands()
    steps: list[float] = []
    clock = steady(hands, steps)
    before = clock()
    hands.step(step)
    hands.tick(10)
    after = clock()
    assert abs((after - before).total_seconds() - 10) <= SLEW * 10 + 1e-9
    assert steps == [pytest.approx(step, abs=SLEW * 10 + 1e-6)]
    hands.tick(10)
    clock()
    assert len(steps) == 1  # reported once


def test_after_a_step_it_converges_on_the_reference_at_the_slew_rate() -> None:
    """A 2 s step is absorbed at 0.5 ms per second: gone after about 4000 s, never overshot."""
    hands = Hands()
    clock = steady(hands)
    clock()
    hands.step(2.0)
    for _ in range(50):
        hands.tick(100)
        offset = (hands.wall - clock()).total_seconds()
        assert offset >= -1e-9
    assert offset == pytest.approx(0.0, abs=1e-6)


def test_it_never_runs_backwards() -> None:
    """Whatever the reference does, each reading is no earlier than the one before."""
    hands = Hands()
    clock = steady(hands)
    last = clock()
    for step in (-600, 5, -1, -3600, 0.5):
        hands.step(step)
        hands.tick(0.25)
        now = clock()
        assert now >= last
        last = now


def test_a_second_step_after_catching_up_is_reported_again() -> None:
    """Once caught up, a new step is news again."""
    hands = Hands()
    steps: list[float] = []
    clock = steady(hands, steps)
    clock()
    hands.step(1.5)
    clock()
    for _ in range(40):
        hands.tick(100)
        clock()
    hands.step(-5)
    hands.tick(FRESH)  # a reading within FRESH of the last one answers that one again
    clock()
    assert len(steps) == 2
    assert steps[1] == pytest.approx(-5, abs=0.01)


def test_readings_within_a_millisecond_are_one_instant() -> None:
    """The token path reads the clock per request; within FRESH the last instant is answered
    again, and the next reading after it moves on (never back)."""
    hands = Hands()
    clock = steady(hands)
    first = clock()
    hands.tick(FRESH / 2)
    assert clock() == first
    hands.tick(FRESH)
    later = clock()
    assert later > first
    assert later - first == pytest.approx(
        timedelta(seconds=1.5 * FRESH), abs=timedelta(microseconds=2)
    )
