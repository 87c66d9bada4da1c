"""Commands that ask the running daemon, over its Unix socket."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from broker.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REAUTH,
    EXIT_USAGE,
    CliError,
    call,
    client_call,
    load,
    now,
    options,
    print_json,
    table,
)
from broker.errors import BrokerError

EXPIRY_GRACE_SECONDS = 5.0  # the daemon reads a login past its expiry as failed


def _read_secret(source: str) -> str:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror}") from None
    value = text.strip()
    if not value or any(ch.isspace() for ch in value):
        raise CliError(f"{source} must hold exactly one token and nothing else")
    return value


# One request of a bulk import stays under the daemon's limit for them (BULK_BODY_BYTES in
# broker.api.app, 256 KiB; not imported here, which would load aiohttp into every command).
BULK_REQUEST_BYTES = 252 * 1024


def cmd_import(args: argparse.Namespace) -> int:
    """Import a refresh token obtained elsewhere, or many from a JSON-lines file."""
    if args.jsonl is not None:
        if args.provider or args.user or args.refresh_token_file:
            raise CliError(
                "give either --jsonl FILE or PROVIDER USER --refresh-token-file", EXIT_USAGE
            )
        return _import_jsonl(args)
    if not (args.provider and args.user and args.refresh_token_file):
        raise CliError(
            "import needs PROVIDER USER --refresh-token-file FILE (or --jsonl FILE)", EXIT_USAGE
        )
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
    grant = call(args, "POST", "/v1/grants", body)
    if args.json:
        print_json(grant)
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
    grants = call(args, "GET", "/v1/grants")
    if args.json:
        print_json(grants)
    elif not grants:
        print("no grants")
    else:
        table(
            [["GRANT", "STATE", "SUB", "ACCESS EXPIRES", "GEN", "LAST ERROR"]]
            + [_grant_row(g) for g in grants]
        )
    return EXIT_OK


def cmd_grants_show(args: argparse.Namespace) -> int:
    """Show one grant."""
    grant = call(args, "GET", f"/v1/grants/{args.provider}/{args.user}")
    if args.json:
        print_json(grant)
    else:
        for key, value in grant.items():
            shown = " ".join(value) if isinstance(value, list) else value
            print(f"{key + ':':20} {'-' if shown is None else shown}")
    return EXIT_OK


def cmd_grants_refresh(args: argparse.Namespace) -> int:
    """Refresh a grant now and show how it stands."""
    grant = call(args, "POST", f"/v1/grants/{args.provider}/{args.user}/refresh")
    if args.json:
        print_json(grant)
    else:
        print(
            f"{grant['provider']}/{grant['user']}: {grant['state']}, generation "
            f"{grant['generation']}, access token until {grant.get('access_expires_at') or '-'}"
            + (f"; last error: {grant['last_error']}" if grant.get("last_error") else "")
        )
    if grant["state"] == "reauth_required":
        return EXIT_REAUTH
    return EXIT_OK if not grant.get("last_error") else EXIT_ERROR


def cmd_grants_revoke(args: argparse.Namespace) -> int:
    """Revoke a grant at its provider and delete it."""
    result = call(args, "DELETE", f"/v1/grants/{args.provider}/{args.user}")
    if args.json:
        print_json(result)
    else:
        where = "at the provider and " if result.get("revoked_at_provider") else ""
        print(f"revoked {args.provider}/{args.user} {where}deleted it")
    return EXIT_OK


def cmd_login(args: argparse.Namespace) -> int:
    """Log a user in: print where to go (and the code to enter there), wait until it completes.

    Without --device the daemon chooses: the device grant when no callback listener serves the
    provider's redirect and the provider offers a device endpoint, else the code flow.
    """
    body: dict[str, Any] = {"provider": args.provider, "user": args.user, "force": args.force}
    if args.device:
        body["method"] = "device"
    started = call(args, "POST", "/v1/logins", body)
    if "user_code" in started:
        _show_device_login(started, args.json)
        where = "at the provider"
    else:
        print(started["authorize_url"], flush=True)
        if not args.no_browser:
            import webbrowser

            if not webbrowser.open(started["authorize_url"]):
                print("token-broker: no browser here; open the URL above", file=sys.stderr)
        where = "in the browser"
    print(
        f"waiting for the login to complete {where} (until {started['expires_at']})...",
        file=sys.stderr,
        flush=True,
    )
    try:
        status = _wait_for_login(args, started)
    except KeyboardInterrupt:
        if "user_code" in started:
            print(
                "token-broker: the login goes on in the daemon until it expires; run the same "
                "command again to see its code and wait for it",
                file=sys.stderr,
            )
        raise
    print(f"logged in: {args.provider}/{args.user}", file=sys.stderr)
    if args.json:  # after the URL's own line: the outcome, for scripts
        print_json({"login_id": started["login_id"], **status})
    return EXIT_OK


def _show_device_login(started: dict[str, Any], as_json: bool) -> None:
    """The verification URI and the user code on lines of their own (or, for scripts, the
    pending login as one line of JSON), and a QR code of the complete URI on a terminal."""
    if as_json:
        print(json.dumps(started, sort_keys=True), flush=True)
        return
    print("On any device with a browser, open this page and enter the code:", file=sys.stderr)
    print(started["verification_uri"], flush=True)
    print(started["user_code"], flush=True)
    complete = started.get("verification_uri_complete")
    if complete and sys.stdout.isatty():
        picture = qr_code(complete)
        if picture is not None:
            print("or scan this code with a phone (it carries the code too):", file=sys.stderr)
            sys.stdout.write(picture)
            sys.stdout.flush()


def qr_code(text: str) -> str | None:
    """`text` as a QR code in Unicode half blocks; None when stdout cannot show them."""
    import io

    import segno

    picture = io.StringIO()
    segno.make(text, micro=False).terminal(out=picture, compact=True, border=2)
    value = picture.getvalue()
    encoding = sys.stdout.encoding or "ascii"
    try:
        value.encode(encoding)
    except UnicodeEncodeError:
        return None
    return value


def _wait_for_login(args: argparse.Namespace, started: dict[str, Any]) -> dict[str, Any]:
    """Poll the login until it completes (its status) or fails (CliError, exit 1)."""
    if args.timeout is not None:
        limit = args.timeout
    else:  # the login's own lifetime, and a little more to read its end
        expires_at = datetime.fromisoformat(started["expires_at"])
        limit = max((expires_at - now()).total_seconds(), 0.0) + EXPIRY_GRACE_SECONDS
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status: dict[str, Any] = call(args, "GET", f"/v1/logins/{started['login_id']}")
        if status["state"] == "complete":
            return status
        if status["state"] == "failed":
            raise CliError(f"login failed: {status.get('error', 'no reason given')}")
        time.sleep(args.poll_interval)
    raise CliError(f"gave up waiting after {limit:g} s; the login may still complete")


EXEC_CREDENTIAL_API = "client.authentication.k8s.io/v1"
FORMATS = ("token", "json", "header", "exec-credential")
GIT_OPERATIONS = ("get", "store", "erase")
_MAX_GIT_INPUT = 64 * 1024  # git sends a few short lines; anything past this is not git


def _fetch_token(args: argparse.Namespace, provider: str, user: str) -> dict[str, Any]:
    query = "" if args.min_ttl is None else f"?min_ttl={args.min_ttl}"
    token: dict[str, Any] = call(args, "GET", f"/v1/tokens/{provider}/{user}{query}")
    return token


def exec_credential(token: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes ExecCredential (client.authentication.k8s.io/v1) carrying the token."""
    return {
        "apiVersion": EXEC_CREDENTIAL_API,
        "kind": "ExecCredential",
        "status": {"token": token["access_token"], "expirationTimestamp": token["expires_at"]},
    }


def cmd_token(args: argparse.Namespace) -> int:
    """Print a fresh access token in the chosen format."""
    token = _fetch_token(args, args.provider, args.user)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        print_json(token)
    elif fmt == "header":
        print(f"Authorization: Bearer {token['access_token']}")
    elif fmt == "exec-credential":
        print(json.dumps(exec_credential(token), indent=2))
    else:
        print(token["access_token"])
    return EXIT_OK


def _import_jsonl(args: argparse.Namespace) -> int:
    """Send the file's lines to the daemon in batches (each stored in one transaction) and
    report created, replaced and failed, with each failed line's number and reason."""
    try:
        text = sys.stdin.read() if args.jsonl == "-" else Path(args.jsonl).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8"
        raise CliError(f"cannot read {args.jsonl}: {reason}") from None
    totals = {"created": 0, "replaced": 0}
    failed: list[tuple[int, str]] = []
    batch: list[tuple[int, str]] = []
    size = 0

    def send() -> None:
        if not batch:
            return
        body = "\n".join(line for _, line in batch).encode()
        answer = client_call(args, "POST", "/v1/grants", body, "application/x-ndjson")
        totals["created"] += int(answer["created"])
        totals["replaced"] += int(answer["replaced"])
        failed.extend((batch[int(f["line"]) - 1][0], str(f["reason"])) for f in answer["failed"])
        batch.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        encoded = len(line.encode()) + 1
        if encoded > BULK_REQUEST_BYTES:
            failed.append((number, f"the line is longer than {BULK_REQUEST_BYTES} bytes"))
            continue
        if size + encoded > BULK_REQUEST_BYTES:
            send()
            size = 0
        batch.append((number, line))
        size += encoded
    send()
    failed.sort()
    if args.json:
        print_json(
            {**totals, "failed": [{"line": number, "reason": why} for number, why in failed]}
        )
    else:
        print(f"created {totals['created']}, replaced {totals['replaced']}, failed {len(failed)}")
        for number, why in failed:
            print(f"line {number}: {why}", file=sys.stderr)
    return EXIT_ERROR if failed else EXIT_OK


def read_git_request(stream: TextIO) -> dict[str, str]:
    """git's credential request: `key=value` lines up to a blank line or the end."""
    attributes: dict[str, str] = {}
    total = 0
    for line in stream:
        total += len(line)
        if total > _MAX_GIT_INPUT:
            raise CliError("the credential request on stdin is too long for git's protocol")
        text = line.rstrip("\n")
        if not text:
            break
        key, sep, value = text.partition("=")
        if sep:
            attributes[key] = value
    return attributes


def _git_username(args: argparse.Namespace, provider: str) -> str:
    """--username, else the provider's git_username in the config, else git's usual oauth2."""
    if args.username:
        if any(ch in args.username for ch in "\n\0"):
            raise CliError("--username must be one line", EXIT_USAGE)
        return str(args.username)
    try:
        config = load(args)
    except BrokerError:
        if not args.socket:
            raise  # without the config there is no socket to ask either
        return "oauth2"  # a caller who may not read the config names the socket
    settings = config.providers.get(provider)
    return "oauth2" if settings is None else settings.git_username


def _loopback(host: str) -> bool:
    """Whether git's `host` (NAME, NAME:PORT or [IPV6]:PORT) is this machine."""
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def cmd_git_credential(args: argparse.Namespace) -> int:
    """git's credential helper: answer `get` with the access token; accept store and erase."""
    request = read_git_request(sys.stdin)
    if args.operation != "get":
        return EXIT_OK  # the broker keeps the token; git has nothing to store or erase here
    provider, sep, user = args.grant.partition("/")
    if not sep or not provider or not user:
        raise CliError(f"{args.grant!r} is not PROVIDER/USER", EXIT_USAGE)
    protocol, host = request.get("protocol", "https"), request.get("host", "")
    if protocol != "https" and not _loopback(host):
        raise CliError(
            f"refusing to send an access token over {protocol} to {host or 'an unnamed host'}; "
            "use an https:// remote"
        )
    username = _git_username(args, provider)
    token = _fetch_token(args, provider, user)
    expiry = datetime.fromisoformat(token["expires_at"].replace("Z", "+00:00"))
    sys.stdout.write(
        f"username={username}\n"
        f"password={token['access_token']}\n"
        f"password_expiry_utc={int(expiry.timestamp())}\n"
    )
    return EXIT_OK


def register(sub: Any) -> None:
    """Add import, grants, login and token to the command parser."""
    client = options(client=True, json_output=True)
    p = sub.add_parser(
        "import",
        parents=[client],
        help="import a refresh token, or many",
        description="Import a refresh token obtained outside the broker "
        "(PROVIDER USER --refresh-token-file FILE), or many from a JSON-lines file "
        '(--jsonl FILE: one object per line, as the body of POST /v1/grants: {"provider", '
        '"user", "refresh_token"[, "access_token", "expires_in", "scope", "force"]}). A bulk '
        "import prints how many were created, replaced and failed, and each failed line's "
        "number and reason; it exits 1 if any failed.",
    )
    p.add_argument("provider", nargs="?")
    p.add_argument("user", nargs="?")
    p.add_argument(
        "--refresh-token-file",
        metavar="FILE",
        help="file holding the refresh token; - reads standard input",
    )
    p.add_argument(
        "--jsonl",
        metavar="FILE",
        help="bulk import: a file of JSON objects, one per line; - reads standard input",
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
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the tokens of an existing active grant (one that needs a login is "
        "replaced without it)",
    )
    p.set_defaults(handler=cmd_import)

    # The group takes -c and --socket too, so they may also come between it and its command.
    grants = sub.add_parser(
        "grants", parents=[client], help="admin views of grants"
    ).add_subparsers(dest="grants_command", required=True, metavar="COMMAND")
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
    p = grants.add_parser(
        "refresh",
        parents=[client],
        help="refresh a grant now",
        description="Refresh the grant at its provider now and show the result; exit 1 when "
        "the refresh failed (the grant keeps its tokens and retries on its own), 3 when a "
        "new login is needed.",
    )
    p.add_argument("provider")
    p.add_argument("user")
    p.set_defaults(handler=cmd_grants_refresh)
    p = grants.add_parser(
        "revoke",
        parents=[client],
        help="revoke at the provider, then delete",
        description="Revoke the grant's refresh token at the provider (where it has a "
        "revocation endpoint), then delete the grant. If the provider cannot be reached "
        "the grant is kept and the command fails: run it again.",
    )
    p.add_argument("provider")
    p.add_argument("user")
    p.set_defaults(handler=cmd_grants_revoke)

    p = sub.add_parser(
        "login",
        parents=[client],
        help="log a user in (authorization code + PKCE, or --device)",
        description="Ask the daemon for a login and wait until it completes (exit 0) or fails "
        "(exit 1). The code flow prints the authorize URL on its own line and opens a browser "
        "unless --no-browser; the provider redirects back to the callback listener (on a "
        "headless server, forward its port: ssh -L 8000:127.0.0.1:8000 HOST). With --device "
        "(RFC 8628) it prints a URL and a code on lines of their own (and a QR code on a "
        "terminal): open the URL on any device, enter the code, and the daemon, which polls "
        "the provider itself, stores the grant; the login goes on if this command is "
        "interrupted. Without --device, a provider whose redirect no callback listener serves "
        "and that offers a device endpoint gets the device grant.",
    )
    p.add_argument("provider")
    p.add_argument("user", help="the label for this grant: [A-Za-z0-9._@-]{1,128}")
    p.add_argument(
        "--device",
        action="store_true",
        help="use the device authorization grant: no browser or callback on this machine",
    )
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    p.add_argument(
        "--force", action="store_true", help="replace a grant held by another account (sub)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait (default: until the login expires: 10 minutes for the code "
        "flow, the provider's code lifetime for --device)",
    )
    p.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_login)

    p = sub.add_parser(
        "token",
        parents=[client],
        help="print an access token",
        description="Print a fresh access token for PROVIDER USER to stdout, as the bare token "
        "(default), the API's JSON (--format json or --json), an HTTP header line (--format "
        "header), or a Kubernetes ExecCredential for kubectl's exec plugins (--format "
        "exec-credential).",
    )
    p.add_argument("provider")
    p.add_argument("user")
    p.add_argument(
        "--min-ttl",
        type=int,
        metavar="SECONDS",
        help="refresh first if the token lives less than this",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="token",
        help="token (default), json, header (Authorization: Bearer ...) or exec-credential "
        f"(a {EXEC_CREDENTIAL_API} ExecCredential)",
    )
    p.set_defaults(handler=cmd_token)

    p = sub.add_parser(
        "git-credential",
        parents=[options(client=True)],
        help="git credential helper serving a grant's access token",
        description="git's credential-helper protocol: `get` reads git's request on stdin and "
        "answers username= (the provider's git_username, default oauth2), password= (the "
        "access token) and password_expiry_utc=; `store` and `erase` are accepted and do "
        "nothing. Errors go to stderr with a non-zero exit, so git tries its next helper. "
        "Configure it for one host only: git config --global "
        "credential.https://HOST.helper '/usr/bin/token-broker git-credential PROVIDER/USER'",
    )
    p.add_argument("grant", metavar="PROVIDER/USER")
    p.add_argument("operation", choices=GIT_OPERATIONS, help="what git asks (get, store, erase)")
    p.add_argument(
        "--username",
        metavar="NAME",
        help="the username to answer with (default: the provider's git_username in the config, "
        "else oauth2)",
    )
    p.add_argument(
        "--min-ttl",
        type=int,
        metavar="SECONDS",
        help="refresh first if the token lives less than this (a long push needs time)",
    )
    p.set_defaults(handler=cmd_git_credential)
