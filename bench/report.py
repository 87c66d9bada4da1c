"""Tables of results: printed for people, written as JSON for the "after" comparison.

A `Report` is one benchmark run: the machine, the load average at its start and end, and its
tables. Each table row that has a target shows the target and whether the figure meets it, so
a later run of the same command reads as before/after against the same goals.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from bench.machine import Machine, loadavg, machine

Cell = str | int | float | None


@dataclass(slots=True)
class Table:
    """Columns, rows and the notes a reader needs to interpret them."""

    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Cell) -> None:
        """Append a row; it must have one cell per column."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))

    def render(self) -> str:
        """The table as aligned text, notes underneath."""
        text = [[cell_text(c) for c in row] for row in self.rows]
        widths = [
            max(len(name), *(len(row[i]) for row in text)) if text else len(name)
            for i, name in enumerate(self.columns)
        ]
        lines = [self.title, "=" * len(self.title)]
        lines.append("  ".join(name.rjust(w) for name, w in zip(self.columns, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in text]
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """For --json output."""
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }


def cell_text(cell: Cell) -> str:
    """How a cell is printed: numbers rounded for reading, None as a dash."""
    if cell is None:
        return "-"
    if isinstance(cell, float):
        if abs(cell) >= 100:
            return f"{cell:,.0f}"
        if abs(cell) >= 10:
            return f"{cell:.1f}"
        return f"{cell:.2f}"
    if isinstance(cell, int):
        return f"{cell:,}"
    return cell


def load_text(start: float, end: float | None, peak: float | None) -> str:
    """How loaded the machine was, in words."""
    text = f"load average {start:.2f} at start"
    if end is not None:
        text += f", {end:.2f} at end"
    if peak is not None:
        text += f", {peak:.2f} at most"
    return text


def verdict(met: bool) -> str:
    """The "meets target" cell."""
    return "yes" if met else "NO"


class LoadWatch:
    """The highest one-minute load average seen, sampled every few seconds on a thread."""

    INTERVAL = 5.0

    def __init__(self) -> None:
        self.peak = loadavg()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loadavg", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.peak = max(self.peak, loadavg())

    def stop(self) -> float:
        """Stop sampling; the peak."""
        self._stop.set()
        self._thread.join()
        return max(self.peak, loadavg())


@dataclass(slots=True)
class Report:
    """One benchmark run: where and when, under what load, and what it found."""

    name: str
    machine: Machine
    started: datetime
    load_start: float
    tables: list[Table] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    load_end: float | None = None
    load_peak: float | None = None
    seconds: float | None = None
    _t0: float = field(default_factory=time.monotonic)
    _watch: LoadWatch = field(default_factory=LoadWatch)

    @classmethod
    def start(cls, name: str, directory: Path) -> Report:
        """Begin a report; `directory` is where the stores live (its disk is described)."""
        return cls(name, machine(directory), datetime.now(UTC), loadavg())

    def finish(self) -> None:
        """Note the end: the load average now and at its highest, and the elapsed time."""
        self.load_peak = self._watch.stop()
        self.load_end = loadavg()
        self.seconds = time.monotonic() - self._t0

    def render(self) -> str:
        """Every table, under a heading that names the machine and the load."""
        heading = (
            f"{self.name}: {self.machine.describe()}; "
            f"{load_text(self.load_start, self.load_end, self.load_peak)}; "
            f"{self.seconds or 0:.0f} s"
        )
        return "\n\n".join([heading, *(t.render() for t in self.tables)]) + "\n"

    def as_dict(self) -> dict[str, Any]:
        """For --json output."""
        return {
            "benchmark": self.name,
            "started": self.started.isoformat(timespec="seconds"),
            "machine": self.machine.as_dict(),
            "load_average": {
                "start": self.load_start,
                "end": self.load_end,
                "max": self.load_peak,
            },
            "seconds": self.seconds,
            "tables": [t.as_dict() for t in self.tables],
            "results": self.results,
        }

    def emit(self, json_path: Path | None, out: TextIO = sys.stdout) -> None:
        """Print the tables; write the JSON file when asked to."""
        out.write(self.render())
        out.flush()
        if json_path is not None:
            json_path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
