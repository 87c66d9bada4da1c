"""The tables of --json result files as Markdown, for docs/performance.md.

    python -m bench.markdown var/bench/serving.json [more.json ...]

Prints, per file, a line naming when it ran and under what load, then each table with its
notes, so a new run's figures can be pasted beside the old ones unchanged.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import Cell, cell_text, load_text


def render(report: dict[str, Any]) -> str:
    """One result file as Markdown."""
    load = report["load_average"]
    when = load_text(load["start"], load.get("end"), load.get("max"))
    lines = [
        f"`{report['benchmark']}`, {report['started']}: {when}; {report['seconds']:.0f} s.",
        "",
    ]
    for table in report["tables"]:
        lines += [f"**{table['title']}**", ""]
        lines.append("| " + " | ".join(table["columns"]) + " |")
        lines.append("|" + "|".join("---:" for _ in table["columns"]) + "|")
        rows: list[list[Cell]] = table["rows"]
        lines += ["| " + " | ".join(cell_text(c) for c in row) + " |" for row in rows]
        lines.append("")
        lines += [f"- {note}" for note in table["notes"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print every given result file as Markdown."""
    p = argparse.ArgumentParser(prog="python -m bench.markdown", description=__doc__.strip())
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    args = p.parse_args(argv)
    print("\n".join(render(json.loads(path.read_text())) for path in args.files))


if __name__ == "__main__":
    main()
