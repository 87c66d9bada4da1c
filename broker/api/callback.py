"""The callback listener: the page the IdP redirects the browser to after login."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from datetime import datetime
from urllib.parse import urlsplit

from aiohttp import web

from broker.login import LoginService

LOGINS = web.AppKey("logins", LoginService)
CALLBACK_CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("callback_clock")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>token-broker: {title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36em;margin:4em auto;line-height:1.5}}
h1{{font-size:1.4em}}</style></head>
<body><h1>{title}</h1><p>{message}</p></body></html>
"""


def page(title: str, message: str, status: int) -> web.Response:
    """A small HTML page that never gets cached or leaks the URL onward."""
    return web.Response(
        text=_PAGE.format(title=html.escape(title), message=html.escape(message)),
        status=status,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
        },
    )


async def callback(request: web.Request) -> web.Response:
    """GET on a provider's redirect_uri path: finish the login its state names."""
    params = {key: request.query[key] for key in request.query}
    outcome = await request.app[LOGINS].complete(params, request.app[CALLBACK_CLOCK]())
    if outcome.ok:
        return page("Signed in", outcome.message, 200)
    return page("Login failed", outcome.message, 400)


def build_callback_app(
    logins: LoginService, clock: Callable[[], datetime], redirect_uris: Iterable[str]
) -> web.Application:
    """Serve every configured redirect_uri path."""
    app = web.Application(client_max_size=16 * 1024)
    app[LOGINS] = logins
    app[CALLBACK_CLOCK] = clock
    for path in sorted({urlsplit(uri).path or "/" for uri in redirect_uris}):
        app.router.add_get(path, callback)
    return app
