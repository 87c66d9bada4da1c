"""Every benchmark in turn at full size: serving, rotation, bulk import, scale (`make bench`).

    python -m bench [--smoke] [--json-dir DIR] [--only NAME] [--log-dir DIR]

With --json-dir, each benchmark's results go to DIR/NAME.json as well. Each benchmark also
runs on its own: python -m bench.NAME --help.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import bulk_import, rotation, scale, serving

BENCHMARKS: dict[str, Callable[[Sequence[str] | None], None]] = {
    "serving": serving.main,
    "rotation": rotation.main,
    "bulk_import": bulk_import.main,
    "scale": scale.main,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Run them all, passing --smoke on and naming each one's JSON file."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that each one runs")
    p.add_argument("--json-dir", type=Path, metavar="DIR", help="write DIR/NAME.json for each")
    p.add_argument("--log-dir", type=Path, metavar="DIR", help="where daemon logs go")
    p.add_argument(
        "--only", choices=sorted(BENCHMARKS), action="append", help="run just these (repeatable)"
    )
    args = p.parse_args(argv)
    if args.json_dir is not None:
        args.json_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for name, run in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        options = ["--smoke"] if args.smoke else []
        if args.log_dir is not None:
            options += ["--log-dir", str(args.log_dir)]
        if args.json_dir is not None:
            options += ["--json", str(args.json_dir / f"{name}.json")]
        run(options)
        print()
    print(f"all benchmarks: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
