"""The command-line options every benchmark takes."""

from __future__ import annotations

import argparse
from pathlib import Path


def parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m MODULE`, described by the module's docstring, with the shared
    options: --smoke, --json, --log-dir, --keep."""
    p = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes: checks that the benchmark runs and prints its table (no useful figures)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    p.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="where daemon logs go (default: inside the temporary directory, removed at the end)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (stores, logs) at the end"
    )
    return p


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers, such as "1,16,64"."""
    return _ints(text, minimum=1)


def counts(text: str) -> list[int]:
    """A comma-separated list of counts, 0 allowed, such as "0,1000,10000"."""
    return _ints(text, minimum=0)


def _ints(text: str, minimum: int) -> list[int]:
    kind = "positive whole numbers" if minimum > 0 else "whole numbers"
    problem = f"expected {kind} separated by commas, such as 1,16,64; got {text!r}"
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(problem) from None
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(problem)
    return values
