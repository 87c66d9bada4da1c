"""An injected wall clock for a subprocess: libfaketime, with an offset the test steps.

`FakeClock(directory)` owns a timestamp file and the environment that makes a subprocess
read it (`clock.env()`, merged into the subprocess's environment):

- LD_PRELOAD: libfaketimeMT, libfaketime's build for threaded programs (it serialises its
  own state; the broker runs threads for SQLite and executors);
- FAKETIME_TIMESTAMP_FILE, re-read on every call (FAKETIME_NO_CACHE=1, about 4 us per
  wall-clock read), so `set_offset()` takes effect at the process's next clock read;
- FAKETIME_DONT_FAKE_MONOTONIC=1: CLOCK_MONOTONIC stays real, so asyncio's loop clock,
  timeouts and sleeps do not jump with the wall clock;
- NO_FAKE_STAT=1: file timestamps stay real (Python's bytecode cache compares them);
- FAKETIME_FORCE_MONOTONIC_FIX=0: on glibc 2.36 libfaketime turns this on by itself, and
  then converts the deadline of a wait on a monotonic condition variable against a faked
  monotonic reading although the monotonic clock is not faked: the deadline lies in the past,
  every timed wait returns at once, and Python's threads, which wait for the GIL that way,
  hand it back and forth without pause (a 20-fold slowdown). Off, the deadline passes
  through unchanged.

`set_offset(3)` puts the process's wall clock (time.time(), datetime.now(), CLOCK_REALTIME)
three seconds ahead of the real one, `set_offset(-600)` ten minutes behind, while it runs.
As a real step would, a backwards step stretches a wait whose deadline is on the wall clock;
Python's own waits (sleep, locks, the GIL, asyncio) are on the monotonic clock and do not
notice. A FAKETIME variable in the environment would override the file: do not set one.

libfaketime 0.9.10 (Debian 12) converts the deadline of clock_nanosleep(CLOCK_MONOTONIC,
TIMER_ABSTIME) as if the monotonic clock were faked even when it is not, and the kernel gets
a negative time: Python 3.11's time.sleep() fails with EINVAL. Later libfaketime releases
leave that deadline untouched; so does a small library preloaded ahead of libfaketime here
(SHIM_SOURCE), compiled with the system's C compiler once per pytest process.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

LIBRARY_NAME = "libfaketimeMT.so.1"
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/faketime", "/usr/local/lib/faketime")

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_nanosleep_fn)(clockid_t, int, const struct timespec *, struct timespec *);

/* The monotonic clock is never faked (FAKETIME_DONT_FAKE_MONOTONIC=1), so a monotonic
   deadline is already a real one: give it to the kernel as it is. Other clocks go on to
   libfaketime, which translates faked wall-clock deadlines. */
int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req,
                    struct timespec *rem)
{
    static clock_nanosleep_fn next;
    if (clock_id == CLOCK_MONOTONIC) {
        return syscall(SYS_clock_nanosleep, clock_id, flags, req, rem) == 0 ? 0 : errno;
    }
    if (next == NULL) {
        next = (clock_nanosleep_fn)dlsym(RTLD_NEXT, "clock_nanosleep");
    }
    return next(clock_id, flags, req, rem);
}
"""

_shim_lock = threading.Lock()
_shim: Path | None = None


def find_libfaketime() -> Path | None:
    """The installed libfaketimeMT (TOKEN_BROKER_LIBFAKETIME overrides), or None."""
    if env := os.environ.get("TOKEN_BROKER_LIBFAKETIME"):
        return Path(env)
    found = (Path(d) / LIBRARY_NAME for d in SEARCH_DIRS)
    return next((p for p in found if p.is_file()), None)


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def _shim_library() -> Path:
    """The compiled clock_nanosleep shim, built on first use and removed when pytest exits."""
    global _shim  # noqa: PLW0603 -- one build per pytest process is the point
    with _shim_lock:
        if _shim is None:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler (cc) to build the libfaketime shim")
            directory = Path(tempfile.mkdtemp(prefix="tb-fakeclock-"))
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            source, library = directory / "shim.c", directory / "shim.so"
            source.write_text(SHIM_SOURCE)
            argv = [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source), "-ldl"]
            done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"building the libfaketime shim failed:\n{done.stderr}")
            _shim = library
        return _shim


class FakeClock:
    """A wall-clock offset for the subprocesses started with `env()`; see the module docstring."""

    def __init__(self, directory: Path, offset: float = 0.0) -> None:
        library = find_libfaketime()
        if library is None:
            raise RuntimeError(f"{LIBRARY_NAME} not found: apt-get install libfaketime")
        self._library = library
        self._shim = _shim_library()
        directory.mkdir(parents=True, exist_ok=True)
        self.timestamp_file = directory / "faketime.rc"
        self._offset = 0.0
        self.set_offset(offset)

    @property
    def offset(self) -> float:
        """Seconds the faked wall clock is ahead of the real one (negative: behind)."""
        return self._offset

    def set_offset(self, seconds: float) -> None:
        """Step the wall clock of every process using this clock to real time + `seconds`."""
        # Replaced in one rename, so a process reading it never sees half a value.
        partial = self.timestamp_file.with_suffix(".partial")
        partial.write_text(f"{seconds:+.6f}\n")
        partial.replace(self.timestamp_file)
        self._offset = seconds

    def env(self) -> dict[str, str]:
        """Environment variables that put a subprocess on this clock."""
        preload = [str(self._shim), str(self._library)]
        if existing := os.environ.get("LD_PRELOAD"):
            preload.append(existing)
        return {
            "LD_PRELOAD": ":".join(preload),
            "FAKETIME_TIMESTAMP_FILE": str(self.timestamp_file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "NO_FAKE_STAT": "1",
            "FAKETIME_FORCE_MONOTONIC_FIX": "0",
        }


@pytest.fixture
def fake_clock(tmp_path: Path) -> FakeClock:
    """A FakeClock at offset 0 in the test's directory (skipped without libfaketime or cc)."""
    if find_libfaketime() is None or _compiler() is None:
        pytest.skip("libfaketime and a C compiler are needed: apt-get install faketime gcc")
    return FakeClock(tmp_path / "fakeclock")
