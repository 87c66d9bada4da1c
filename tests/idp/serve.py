"""Run the test IdP: `python -m tests.idp.serve --port P --db PATH --key PATH [options]`.

With `--fd N` it serves on an already listening socket inherited from the parent (the pytest
fixture binds the port, so no other process can take it between choosing and serving).
`--migrate-only` builds the session's template database and exits. The server is Django's own
threaded WSGI server (what `runserver` uses) with a listen backlog of 128 rather than 10, so a
burst of ~50 concurrent requests queues instead of waiting on SYN retransmits.

`--issuer` pins the issuer, and with it the origin of every endpoint URL in the discovery
documents, to another origin, such as a proxy's in front of this server; its path must be /o,
where DOT is mounted.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from typing import NoReturn

CLIENT_ID = "broker-test"
# A DOT Application allows one grant type: the device grant (RFC 8628) has a public client of
# its own, with the same settings otherwise.
DEVICE_CLIENT_ID = "broker-device"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.idp.serve")
    parser.add_argument("--db", required=True, help="SQLite file (copied from the template)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fd", type=int, help="an inherited listening socket to serve on")
    parser.add_argument("--key", default="", help="PEM file with the RS256 signing key")
    parser.add_argument("--redirect-uri", action="append", default=[], dest="redirect_uris")
    parser.add_argument("--user", action="append", default=[], help="NAME:PASSWORD")
    parser.add_argument("--access-token-lifetime", type=int, default=36000)
    parser.add_argument("--refresh-grace", type=int, default=0)
    parser.add_argument("--no-reuse-protection", action="store_true")
    parser.add_argument("--issuer", default="", help="e.g. http://127.0.0.1:PROXY_PORT/o")
    parser.add_argument("--migrate-only", action="store_true")
    return parser.parse_args(argv)


def _configure(args: argparse.Namespace) -> None:
    os.environ.update(
        DJANGO_SETTINGS_MODULE="tests.idp.django_project.settings",
        TB_IDP_DB=args.db,
        TB_IDP_PORT=str(args.port),
        TB_IDP_KEY=args.key,
        TB_IDP_ACCESS_TOKEN_LIFETIME=str(args.access_token_lifetime),
        TB_IDP_REFRESH_GRACE=str(args.refresh_grace),
        TB_IDP_REUSE_PROTECTION="0" if args.no_reuse_protection else "1",
        TB_IDP_ISSUER=args.issuer,
    )
    import django

    django.setup()


def _provision(redirect_uris: list[str], users: list[str]) -> None:
    """Create (or, after a restart, update) the public clients and the users."""
    from django.contrib.auth import get_user_model
    from oauth2_provider.models import get_application_model  # type: ignore[import-untyped]

    application = get_application_model()
    for client_id, grant_type, uris in (
        (CLIENT_ID, application.GRANT_AUTHORIZATION_CODE, redirect_uris),
        (DEVICE_CLIENT_ID, application.GRANT_DEVICE_CODE, []),
    ):
        application.objects.update_or_create(
            client_id=client_id,
            defaults={
                "name": "token-broker tests",
                "client_type": application.CLIENT_PUBLIC,
                "authorization_grant_type": grant_type,
                "algorithm": application.RS256_ALGORITHM,
                "redirect_uris": " ".join(uris),
                "client_secret": "",
                "hash_client_secret": False,
                "skip_authorization": False,
            },
        )
    user_model = get_user_model()
    for entry in users:
        name, _, password = entry.partition(":")
        user, _ = user_model.objects.get_or_create(username=name)
        user.set_password(password)
        user.save()


def _serve(sock: socket.socket) -> NoReturn:
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    class Server(ThreadedWSGIServer):
        request_queue_size = 128

    server = Server(sock.getsockname(), WSGIRequestHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    # What WSGIServer.server_bind would set, without its reverse DNS lookup.
    server.server_address = sock.getsockname()
    server.server_name, server.server_port = "127.0.0.1", sock.getsockname()[1]
    server.setup_environ()
    server.set_app(WSGIHandler())

    def stop(signum: int, frame: object) -> NoReturn:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    raise SystemExit(0)


def _exit_with_parent() -> None:
    """End this server if the test process that started it dies without stopping it."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    _configure(args)
    if args.migrate_only:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        return
    _exit_with_parent()
    _provision(args.redirect_uris, args.user)
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.create_server(("127.0.0.1", args.port), backlog=128)
    print(f"test IdP serving on http://127.0.0.1:{sock.getsockname()[1]}", file=sys.stderr)
    _serve(sock)


if __name__ == "__main__":
    main()
