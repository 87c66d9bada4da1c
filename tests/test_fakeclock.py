"""FakeClock steps a running subprocess's wall clock and leaves its monotonic clock alone."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from tests import fakeclock
from tests.daemon import clean_env, make_home, request, running_daemon
from tests.fakeclock import FakeClock

fake_clock = fakeclock.fake_clock

# Prints its wall and monotonic clocks every 50 ms (time.sleep: the call libfaketime 0.9.10
# breaks without the shim), for at most 20 s.
PROBE = """
import json, time
for _ in range(400):
    print(json.dumps({"wall": time.time(), "mono": time.monotonic()}), flush=True)
    time.sleep(0.05)
"""

# Exercises every way Python waits, on the fake clock; prints what it saw.
WAITS = """
import asyncio, json, queue, subprocess, sys, threading, time
from datetime import UTC, datetime
started = time.monotonic()
time.sleep(0.05)
threading.Event().wait(0.05)
try:
    queue.Queue().get(timeout=0.05)
except queue.Empty:
    pass
worker = threading.Thread(target=time.sleep, args=(0.05,))
worker.start()
worker.join(5)
asyncio.run(asyncio.sleep(0.05))
child = subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                       capture_output=True, text=True, timeout=30, check=True)
print(json.dumps({"elapsed": time.monotonic() - started, "now": datetime.now(UTC).timestamp(),
                  "child": float(child.stdout)}))
"""

# Two threads that need the GIL in turn; prints the seconds they took.
CONTENTION = """
import threading, time
def spin():
    x = 0
    for i in range(1_000_000):
        x += i
started = time.monotonic()
threads = [threading.Thread(target=spin) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(time.monotonic() - started)
"""


async def _run(script: str, env: dict[str, str]) -> str:
    """Run a Python script in a subprocess (bounded); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def _samples(
    stream: asyncio.StreamReader, expected_skew: float, limit: float = 5.0
) -> list[dict[str, Any]]:
    """Probe lines until one shows the wall clock `expected_skew` from the real one (±0.5 s)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(stream.readline(), limit)
        assert line, "the probe ended early"
        sample = json.loads(line)
        seen.append(sample)
        if abs(sample["wall"] - time.time() - expected_skew) < 0.5:
            return seen
    raise AssertionError(f"no sample {expected_skew:+} s off the real clock; last {seen[-1:]}")


async def test_the_wall_clock_steps_and_the_monotonic_clock_does_not(
    fake_clock: FakeClock,
) -> None:
    """A running probe sees time.time() jump by +3 s then -603 s while time.monotonic() flows."""
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PROBE,
        stdout=asyncio.subprocess.PIPE,
        env=clean_env(fake_clock.env()),
    )
    assert probe.stdout is not None
    try:
        samples = await _samples(probe.stdout, 0.0)
        fake_clock.set_offset(3)
        samples += await _samples(probe.stdout, 3.0)
        fake_clock.set_offset(-600)
        samples += await _samples(probe.stdout, -600.0)
    finally:
        probe.kill()  # this test's own child, by its pid
        await probe.wait()
    walls = [b["wall"] - a["wall"] for a, b in itertools.pairwise(samples)]
    monos = [b["mono"] - a["mono"] for a, b in itertools.pairwise(samples)]
    assert any(2.5 < step < 4 for step in walls), walls
    assert any(-604 < step < -602 for step in walls), walls
    assert all(0 < step < 2 for step in monos), monos


async def test_sleeps_threads_and_children_work_on_a_fake_clock(fake_clock: FakeClock) -> None:
    """time.sleep, thread and queue waits, asyncio and a child process all run 600 s behind."""
    fake_clock.set_offset(-600)
    seen = json.loads(await _run(WAITS, clean_env(fake_clock.env())))
    assert 0.25 <= seen["elapsed"] < 10
    assert abs(seen["now"] - time.time() + 600) < 5
    assert abs(seen["child"] - time.time() + 600) < 5  # children inherit the clock


async def test_threads_hand_over_the_gil_at_the_usual_pace(fake_clock: FakeClock) -> None:
    """Two threads taking turns on the GIL run about as fast on the fake clock as off it."""
    fake_clock.set_offset(-600)
    plain = float(await _run(CONTENTION, clean_env()))
    faked = float(await _run(CONTENTION, clean_env(fake_clock.env())))
    # With timed GIL waits returning at once this takes 15 to 80 times as long.
    assert faked < 4 * plain + 1.0, (plain, faked)


def test_a_broker_daemon_runs_on_a_stepped_clock(
    fake_clock: FakeClock, tmp_path: Path, log_dir: Path
) -> None:
    """The daemon serves 600 s behind, follows a step to +3 s, and still exits cleanly."""
    fake_clock.set_offset(-600)
    home = make_home(tmp_path)
    with running_daemon(home, log_dir, env=fake_clock.env()) as daemon:
        behind = request(home.socket, "GET", "/healthz")
        fake_clock.set_offset(3)
        ahead = request(home.socket, "GET", "/healthz")
        log = daemon.log()
    assert (behind.status, ahead.status) == (200, 200)
    assert abs(_date(behind.headers) - time.time() + 600) < 5
    assert abs(_date(ahead.headers) - time.time() - 3) < 5
    stamps = [json.loads(line)["timestamp"] for line in log.splitlines() if line.startswith("{")]
    assert stamps, log
    first = datetime.fromisoformat(stamps[0].replace("Z", "+00:00")).timestamp()
    assert abs(first - time.time() + 600) < 30  # logged at start, on the clock 600 s behind


def _date(headers: Mapping[str, str]) -> float:
    """Epoch seconds of a response's HTTP Date header."""
    return parsedate_to_datetime(headers["Date"]).timestamp()
