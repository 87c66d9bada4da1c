"""The `token-broker` command: argument parsing and human or --json output, nothing else."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import broker
from broker.client import ApiError, BrokerClient, DaemonUnreachable
from broker.config import Config, load_config, resolve_config_path
from broker.errors import BrokerError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REAUTH, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
ROTATE_BATCH = 100

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A failure to report as `token-broker: MESSAGE` with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# -- helpers ---------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config, os.environ))


def _client(args: argparse.Namespace) -> BrokerClient:
    if args.socket:
        return BrokerClient(Path(args.socket))
    return BrokerClient(_config(args).server.socket)


def _call(args: argparse.Namespace, method: str, path: str, body: object | None = None) -> Any:
    try:
        return _client(args).call(method, path, body)
    except DaemonUnreachable as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from None
    except ApiError as exc:
        code = EXIT_REAUTH if exc.code == "reauth_required" else EXIT_ERROR
        raise CliError(f"{exc.detail} ({exc.code})", code) from None


def _now() -> datetime:
    return datetime.now(UTC)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: Sequence[Sequence[str]], out: TextIO = sys.stdout) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _progress(done: int, total: int, out: TextIO = sys.stderr) -> None:
    width = 30
    filled = width if total == 0 else width * done // total
    bar = "#" * filled + "-" * (width - filled)
    end = "\n" if done >= total else ""
    if out.isatty():
        out.write(f"\rre-encrypting [{bar}] {done}/{total}{end}")
    elif done >= total or done == 0:
        out.write(f"re-encrypting [{bar}] {done}/{total}\n")
    out.flush()


# -- daemon and store commands ---------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon."""
    from broker.daemon import serve
    from broker.log import configure_logging, get_logger

    config = _config(args)
    configure_logging(level=args.log_level)
    try:
        asyncio.run(serve(config))
    except BrokerError as exc:
        get_logger("broker.daemon").error("startup_failed", error=str(exc))
        return EXIT_ERROR
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config."""
    config = _config(args)
    print(
        f"{config.source}: ok ({len(config.providers)} provider(s), "
        f"{len(config.clients)} client(s))"
    )
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Migrate the store to the newest schema."""
    from broker.store.engine import create_engine
    from broker.store.migrate import upgrade

    async def run() -> tuple[str | None, str | None]:
        engine = create_engine(_config(args).store.url)
        try:
            return await upgrade(engine)
        finally:
            await engine.dispose()

    before, after = asyncio.run(run())
    if before == after:
        print(f"store already at revision {after}")
    else:
        print(f"store upgraded from {before or 'empty'} to {after}")
    return EXIT_OK


def _key_file(args: argparse.Namespace) -> Path:
    return Path(args.key_file) if args.key_file else _config(args).store.key_file


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Create a new keyring file."""
    from broker.crypto import Keyring, write_keyring

    path = _key_file(args)
    keyring = Keyring.generate(_now())
    write_keyring(path, keyring, replace=False)
    print(f"wrote keyring {path} (mode 0600) with primary key {keyring.primary}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Add a primary key and re-encrypt every grant with it."""
    from broker.crypto import load_keyring, write_keyring
    from broker.store.engine import create_engine
    from broker.store.migrate import require_current
    from broker.store.repository import GrantRepository

    config = _config(args)
    path = _key_file(args)

    async def run() -> None:
        keyring = load_keyring(path)
        engine = create_engine(config.store.url)
        try:
            await require_current(engine)
            repository = GrantRepository(engine, keyring)
            pending = await repository.count_not_under(keyring.primary)
            if pending and not args.new_key:
                print(f"resuming: {pending} grant(s) not yet under primary key {keyring.primary}")
            else:
                keyring = keyring.with_new_primary(_now())
                # The file holds old and new keys before any row moves: an interruption at any
                # point leaves every row readable.
                write_keyring(path, keyring, replace=True)
                repository.keyring = keyring
                print(f"new primary key {keyring.primary} written to {path}")
            total = await repository.count_not_under(keyring.primary)
            done = 0
            _progress(done, total)
            while done < total:
                moved = await repository.reseal_batch(ROTATE_BATCH)
                remaining = await repository.count_not_under(keyring.primary)
                done = total - remaining
                if moved == 0 and remaining:
                    continue  # rows changed under us; the next batch picks them up
                _progress(min(done, total), total)
            print(
                f"every grant is sealed with {keyring.primary}; restart or reload the daemon "
                "if it runs with a copied keyring (systemd LoadCredential)"
            )
        finally:
            await engine.dispose()

    asyncio.run(run())
    return EXIT_OK


def cmd_keys_status(args: argparse.Namespace) -> int:
    """Show which key seals how many grants."""
    from broker.crypto import load_keyring
    from broker.store.engine import create_engine
    from broker.store.migrate import require_current
    from broker.store.repository import GrantRepository

    config = _config(args)
    keyring = load_keyring(_key_file(args))

    async def run() -> dict[str | None, int]:
        engine = create_engine(config.store.url)
        try:
            await require_current(engine)
            usage = await GrantRepository(engine, keyring).key_usage()
            return {u.key_id: u.grants for u in usage}
        finally:
            await engine.dispose()

    counts = asyncio.run(run())
    rows = [
        {
            "key_id": key_id,
            "primary": key_id == keyring.primary,
            "in_keyring": True,
            "grants": counts.get(key_id, 0),
        }
        for key_id in sorted(keyring.keys)
    ]
    missing = sorted(k for k in counts if k is not None and k not in keyring.keys)
    rows += [
        {"key_id": k, "primary": False, "in_keyring": False, "grants": counts[k]} for k in missing
    ]
    if args.json:
        _print_json({"keys": rows, "unsealed_grants": counts.get(None, 0)})
    else:
        table = [["KEY", "PRIMARY", "GRANTS", "NOTE"]]
        for row in rows:
            note = "" if row["in_keyring"] else "NOT IN KEYRING: these grants cannot be opened"
            table.append(
                [str(row["key_id"]), "yes" if row["primary"] else "", str(row["grants"]), note]
            )
        _table(table)
    return EXIT_ERROR if missing else EXIT_OK


# -- client commands -------------------------------------------------------------------------


def _read_secret(source: str) -> str:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror}") from None
    value = text.strip()
    if not value or any(ch.isspace() for ch in value):
        raise CliError(f"{source} must hold exactly one token and nothing else")
    return value


def cmd_import(args: argparse.Namespace) -> int:
    """Import a refresh token obtained elsewhere."""
    body: dict[str, Any] = {
        "provider": args.provider,
        "user": args.user,
        "refresh_token": _read_secret(args.refresh_token_file),
    }
    if args.access_token_file:
        if args.expires_in is None:
            raise CliError("--access-token-file needs --expires-in", EXIT_USAGE)
        body["access_token"] = _read_secret(args.access_token_file)
        body["expires_in"] = args.expires_in
    if args.scope is not None:
        body["scope"] = args.scope
    if args.force:
        body["force"] = True
    grant = _call(args, "POST", "/v1/grants", body)
    if args.json:
        _print_json(grant)
    else:
        print(f"imported {grant['provider']}/{grant['user']} (generation {grant['generation']})")
    return EXIT_OK


def _grant_row(grant: dict[str, Any]) -> list[str]:
    return [
        f"{grant['provider']}/{grant['user']}",
        grant["state"],
        grant.get("sub") or "-",
        grant.get("access_expires_at") or "-",
        str(grant["generation"]),
        grant.get("last_error") or "",
    ]


def cmd_grants_list(args: argparse.Namespace) -> int:
    """List grants."""
    grants = _call(args, "GET", "/v1/grants")["grants"]
    if args.json:
        _print_json(grants)
    elif not grants:
        print("no grants")
    else:
        _table(
            [["GRANT", "STATE", "SUB", "ACCESS EXPIRES", "GEN", "LAST ERROR"]]
            + [_grant_row(g) for g in grants]
        )
    return EXIT_OK


def cmd_grants_show(args: argparse.Namespace) -> int:
    """Show one grant."""
    grant = _call(args, "GET", f"/v1/grants/{args.provider}/{args.user}")
    if args.json:
        _print_json(grant)
    else:
        for key, value in grant.items():
            shown = " ".join(value) if isinstance(value, list) else value
            print(f"{key + ':':20} {'-' if shown is None else shown}")
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    """Print a fresh access token."""
    query = "" if args.min_ttl is None else f"?min_ttl={args.min_ttl}"
    token = _call(args, "GET", f"/v1/tokens/{args.provider}/{args.user}{query}")
    if args.json:
        _print_json(token)
    else:
        print(token["access_token"])
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------


def _common(*, client: bool = False, json_output: bool = False) -> argparse.ArgumentParser:
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
    plain, client = _common(), _common(client=True, json_output=True)

    p = sub.add_parser(
        "serve",
        parents=[plain],
        help="run the daemon",
        description="Run the daemon: migrate the store, then serve the API.",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("TOKEN_BROKER_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    p.set_defaults(handler=cmd_serve)
    p = sub.add_parser(
        "check-config",
        parents=[plain],
        help="validate the config",
        description="Validate the config; print every problem and exit 1.",
    )
    p.set_defaults(handler=cmd_check_config)

    db = sub.add_parser("db", help="store maintenance").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    p = db.add_parser(
        "upgrade",
        parents=[plain],
        help="run migrations",
        description="Migrate the store to the newest schema.",
    )
    p.set_defaults(handler=cmd_db_upgrade)

    keys = sub.add_parser("keys", help="the encryption keyring").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    key_file = _common()
    key_file.add_argument(
        "--key-file",
        metavar="PATH",
        default=None,
        help="keyring file (default: the config's store.key_file)",
    )
    p = keys.add_parser(
        "generate",
        parents=[key_file],
        help="create a new keyring",
        description="Write a new keyring with one key (mode 0600). "
        "Refuses to overwrite an existing file.",
    )
    p.set_defaults(handler=cmd_keys_generate)
    p = keys.add_parser(
        "rotate",
        parents=[key_file],
        help="add a primary key, re-encrypt",
        description="Add a new primary key and re-encrypt every grant with it, "
        "in batches. Safe to interrupt: run it again to finish.",
    )
    p.add_argument(
        "--new-key",
        action="store_true",
        help="add another key even when an earlier rotation is unfinished",
    )
    p.set_defaults(handler=cmd_keys_rotate)
    p = keys.add_parser(
        "status",
        parents=[key_file],
        help="which key seals how many grants",
        description="Show which key seals how many grants.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_keys_status)

    p = sub.add_parser(
        "import",
        parents=[client],
        help="import a refresh token",
        description="Import a refresh token obtained outside the broker.",
    )
    p.add_argument("provider")
    p.add_argument("user")
    p.add_argument(
        "--refresh-token-file",
        required=True,
        metavar="FILE",
        help="file holding the refresh token; - reads standard input",
    )
    p.add_argument(
        "--access-token-file",
        metavar="FILE",
        help="file holding a current access token (needs --expires-in)",
    )
    p.add_argument(
        "--expires-in", type=int, metavar="SECONDS", help="remaining life of the access token"
    )
    p.add_argument("--scope", help="space-separated scopes (default: the provider's)")
    p.add_argument("--force", action="store_true", help="replace an existing grant's tokens")
    p.set_defaults(handler=cmd_import)

    grants = sub.add_parser("grants", help="admin views of grants").add_subparsers(
        dest="grants_command", required=True, metavar="COMMAND"
    )
    p = grants.add_parser(
        "list", parents=[client], help="list grants", description="List grants, without secrets."
    )
    p.set_defaults(handler=cmd_grants_list)
    p = grants.add_parser(
        "show",
        parents=[client],
        help="show one grant",
        description="Show one grant, without secrets.",
    )
    p.add_argument("provider")
    p.add_argument("user")
    p.set_defaults(handler=cmd_grants_show)

    p = sub.add_parser(
        "token",
        parents=[client],
        help="print an access token",
        description="Print a fresh access token for PROVIDER USER to stdout.",
    )
    p.add_argument("provider")
    p.add_argument("user")
    p.add_argument(
        "--min-ttl",
        type=int,
        metavar="SECONDS",
        help="refresh first if the token lives less than this",
    )
    p.set_defaults(handler=cmd_token)
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
