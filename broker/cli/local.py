"""Commands that work on the config, the store and the keyring directly: no daemon needed."""

from __future__ import annotations

import argparse
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from broker.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    load,
    now,
    options,
    print_json,
    progress,
    table,
)
from broker.errors import BrokerError

ROTATE_BATCH = 100

T = TypeVar("T")


def run_loop(coroutine: Coroutine[Any, Any, T], *, fast_loop: bool = False) -> T:
    """Run `coroutine` to its end: asyncio is imported only by the commands that use it, so
    the client commands (token, git-credential, import) start faster. With `fast_loop`, on
    uvloop when it is installed (the `fast` extra): the daemon's refreshes cost about a tenth
    less CPU on it (docs/performance.md). The serving benchmark's bare handler runs on the
    loop this picks too."""
    import asyncio

    if fast_loop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon."""
    from broker.daemon import serve
    from broker.log import configure_logging, get_logger

    config = load(args)
    json_logs = {"json": True, "console": False}.get(args.log_format)
    configure_logging(level=args.log_level, json=json_logs)
    try:
        run_loop(serve(config), fast_loop=True)
    except BrokerError as exc:
        get_logger("broker.daemon").error("startup_failed", error=str(exc))
        return EXIT_ERROR
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config."""
    config = load(args)
    print(
        f"{config.source}: ok ({len(config.providers)} provider(s), "
        f"{len(config.clients)} client(s), {len(config.sinks)} sink(s))"
    )
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Migrate the store to the newest schema."""
    from broker.store.engine import store_engine
    from broker.store.migrate import upgrade

    async def run() -> tuple[str | None, str | None]:
        engine = store_engine(load(args).store)
        try:
            return await upgrade(engine)
        finally:
            await engine.dispose()

    before, after = run_loop(run())
    if before == after:
        print(f"store already at revision {after}")
    else:
        print(f"store upgraded from {before or 'empty'} to {after}")
    return EXIT_OK


def _key_file(args: argparse.Namespace) -> Path:
    return Path(args.key_file) if args.key_file else load(args).store.key_file


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Create a new keyring file."""
    from broker.crypto import Keyring, write_keyring

    path = _key_file(args)
    keyring = Keyring.generate(now())
    write_keyring(path, keyring, replace=False)
    print(f"wrote keyring {path} (mode 0600) with primary key {keyring.primary}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Add a primary key and re-encrypt every grant with it."""
    from broker.crypto import load_keyring, write_keyring
    from broker.store.engine import store_engine
    from broker.store.migrate import require_current
    from broker.store.repository import GrantRepository

    config = load(args)
    path = _key_file(args)

    async def run() -> None:
        keyring = load_keyring(path)
        engine = store_engine(config.store)
        try:
            await require_current(engine)
            repository = GrantRepository(engine, keyring)
            pending = await repository.count_not_under(keyring.primary)
            if pending and not args.new_key:
                print(f"resuming: {pending} grant(s) not yet under primary key {keyring.primary}")
            else:
                keyring = keyring.with_new_primary(now())
                # The file holds old and new keys before any row moves: an interruption at any
                # point leaves every row readable.
                write_keyring(path, keyring, replace=True)
                repository.keyring = keyring
                print(f"new primary key {keyring.primary} written to {path}")
            total = await repository.count_not_under(keyring.primary)
            done = 0
            progress(done, total)
            while done < total:
                moved = await repository.reseal_batch(ROTATE_BATCH)
                remaining = await repository.count_not_under(keyring.primary)
                done = total - remaining
                if moved == 0 and remaining:
                    continue  # rows changed under us; the next batch picks them up
                progress(min(done, total), total)
            print(
                f"every grant is sealed with {keyring.primary}; restart the daemon now if it "
                "reads a copy of the keyring (systemd LoadCredential): a reload does not re-copy it"
            )
        finally:
            await engine.dispose()

    run_loop(run())
    return EXIT_OK


def cmd_keys_status(args: argparse.Namespace) -> int:
    """Show which key seals how many grants."""
    from broker.crypto import load_keyring
    from broker.store.engine import store_engine
    from broker.store.migrate import require_current
    from broker.store.repository import GrantRepository

    config = load(args)
    keyring = load_keyring(_key_file(args))

    async def run() -> dict[str | None, int]:
        engine = store_engine(config.store)
        try:
            await require_current(engine)
            usage = await GrantRepository(engine, keyring).key_usage()
            return {u.key_id: u.grants for u in usage}
        finally:
            await engine.dispose()

    counts = run_loop(run())
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
        print_json({"keys": rows, "unsealed_grants": counts.get(None, 0)})
    else:
        lines = [["KEY", "PRIMARY", "GRANTS", "NOTE"]]
        for row in rows:
            note = "" if row["in_keyring"] else "NOT IN KEYRING: these grants cannot be opened"
            lines.append(
                [str(row["key_id"]), "yes" if row["primary"] else "", str(row["grants"]), note]
            )
        table(lines)
    return EXIT_ERROR if missing else EXIT_OK


def register(sub: Any) -> None:
    """Add serve, check-config, db and keys to the command parser."""
    plain = options()
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
    p.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="JSON lines, or a human console format; auto picks console only on a terminal",
    )
    p.set_defaults(handler=cmd_serve)
    p = sub.add_parser(
        "check-config",
        parents=[plain],
        help="validate the config",
        description="Validate the config; print every problem and exit 1.",
    )
    p.set_defaults(handler=cmd_check_config)

    # The groups take -c too, so it may also come between a group and its command.
    db = sub.add_parser("db", parents=[plain], help="store maintenance").add_subparsers(
        dest="db_command", required=True, metavar="COMMAND"
    )
    p = db.add_parser(
        "upgrade",
        parents=[plain],
        help="run migrations",
        description="Migrate the store to the newest schema.",
    )
    p.set_defaults(handler=cmd_db_upgrade)

    keys = sub.add_parser("keys", parents=[plain], help="the encryption keyring").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    key_file = options()
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
