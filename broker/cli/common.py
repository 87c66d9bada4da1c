"""What every command shares: exit codes, errors, config and daemon access, output helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from broker.client import ApiError, BrokerClient, DaemonUnreachable
from broker.config import Config, load_config, resolve_config_path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REAUTH, EXIT_UNREACHABLE = 0, 1, 2, 3, 4


class CliError(Exception):
    """A failure to report as `token-broker: MESSAGE` with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def load(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config, os.environ))


def client_of(args: argparse.Namespace) -> BrokerClient:
    if args.socket:
        return BrokerClient(Path(args.socket))
    return BrokerClient(load(args).server.socket)


def call(args: argparse.Namespace, method: str, path: str, body: object | None = None) -> Any:
    try:
        return client_of(args).call(method, path, body)
    except DaemonUnreachable as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from None
    except ApiError as exc:
        code = EXIT_REAUTH if exc.code == "reauth_required" else EXIT_ERROR
        raise CliError(f"{exc.detail} ({exc.code})", code) from None


def client_call(
    args: argparse.Namespace, method: str, path: str, body: bytes, content_type: str
) -> Any:
    """`call` with a raw body of `content_type`."""
    try:
        return client_of(args).call(method, path, body, content_type=content_type)
    except DaemonUnreachable as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from None
    except ApiError as exc:
        code = EXIT_REAUTH if exc.code == "reauth_required" else EXIT_ERROR
        raise CliError(f"{exc.detail} ({exc.code})", code) from None


def now() -> datetime:
    return datetime.now(UTC)


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def table(rows: Sequence[Sequence[str]], out: TextIO = sys.stdout) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def progress(done: int, total: int, out: TextIO = sys.stderr) -> None:
    width = 30
    filled = width if total == 0 else width * done // total
    bar = "#" * filled + "-" * (width - filled)
    end = "\n" if done >= total else ""
    if out.isatty():
        out.write(f"\rre-encrypting [{bar}] {done}/{total}{end}")
    elif done >= total or done == 0:
        out.write(f"re-encrypting [{bar}] {done}/{total}\n")
    out.flush()


def options(*, client: bool = False, json_output: bool = False) -> argparse.ArgumentParser:
    # Options that work before or after the subcommand: SUPPRESS keeps the subcommand's parser
    # from overwriting a value given before it.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="config file (default: $TOKEN_BROKER_CONFIG, else /etc/token-broker/config.toml)",
    )
    if client:
        parent.add_argument(
            "--socket",
            default=argparse.SUPPRESS,
            metavar="PATH",
            help="the daemon's Unix socket (default: the config's server.socket)",
        )
    if json_output:
        parent.add_argument("--json", action="store_true", help="machine-readable output")
    return parent
