"""The `token-broker` command: argument parsing and human or --json output, nothing else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import broker
from broker.cli import local, remote
from broker.cli.common import EXIT_ERROR, CliError
from broker.errors import BrokerError

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar."""
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Keeps OAuth 2.0 grants fresh and hands access tokens to local services.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 re-authentication required, "
        "4 daemon unreachable",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {broker.__version__}")
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=None,
        help="config file (default: $TOKEN_BROKER_CONFIG, else /etc/token-broker/config.toml)",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="the daemon's Unix socket, for client commands",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    local.register(sub)
    remote.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `token-broker`; returns the exit code."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CliError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return exc.code
    except BrokerError as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("token-broker: interrupted", file=sys.stderr)
        return 130
