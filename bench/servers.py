"""Helper servers a benchmark runs beside the daemon (the bare handler, the fake provider).

Each is a Python subprocess started here and stopped here by its pid: SIGTERM, then SIGKILL
to that same pid if it does not exit in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@contextlib.contextmanager
def python_server(
    module: str, args: list[str], ready: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m module args...` until the block ends; it is up once `ready` exists."""
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{module} did not start (see {log}):\n{tail}")
            time.sleep(0.02)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM this one process and wait; SIGKILL it if it hangs. Its exit code."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
