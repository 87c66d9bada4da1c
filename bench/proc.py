"""Resident memory and CPU time of a process, read from /proc as `ps` and `top` read them."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS: is {pid} a kernel thread?")


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat from field 3 (state) on; field n of proc(5) is [n - 3]."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses; fields resume after its ")".
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, in seconds."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def parent(pid: int) -> int:
    """The parent process id."""
    return int(_stat(pid)[1])


def family_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, its children that still run and those it has reaped.

    For a server that forks a process per connection (PostgreSQL's postmaster), this is the
    whole server's CPU so far.
    """
    fields = _stat(pid)
    own = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime (reaped children)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat(int(entry.name))
        except (OSError, ValueError):
            continue  # exited meanwhile
        if child[1] == str(pid):
            own += int(child[11]) + int(child[12])
    return own / _TICKS
