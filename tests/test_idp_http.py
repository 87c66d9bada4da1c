"""The IdP transport: which failures mean "never sent" and which mean "may have been processed".

ROTATION.md invariant 4 rests on this split: IdpUnreachable lets the refresher retry with the same
refresh token, IdpAmbiguous sends it down the grace/replay path. Every server here is real and on
127.0.0.1; the raw ones misbehave below HTTP to produce each failure on purpose.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from broker.errors import IdpAmbiguous, IdpError, IdpUnreachable
from broker.idp.http import MAX_BODY_BYTES, send

NewSecret = Callable[[str], str]
FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def short_session(
    *,
    total: float = 5.0,
    connect: float = 2.0,
    sock_read: float = 2.0,
    resolver: AbstractResolver | None = None,
) -> aiohttp.ClientSession:
    """A session built like broker.idp.http.new_session, with timeouts a test can wait out."""
    connector = aiohttp.TCPConnector(force_close=True, resolver=resolver)
    timeout = aiohttp.ClientTimeout(
        total=total, connect=connect, sock_connect=connect, sock_read=sock_read
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout, raise_for_status=False)


class RawServer:
    """A loopback TCP server whose handler misbehaves below HTTP; it keeps what it read."""

    Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        # Handlers that hang wait on this; teardown sets it so no task outlives the test.
        self.release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    def url(self, path: str, scheme: str = "http") -> str:
        """An absolute URL on this server."""
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one whole HTTP/1.1 request (head and Content-Length body) and record it."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up first, which is what several tests arrange
        finally:
            writer.transport.abort()

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        assert self._server is not None
        self._server.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self._server.wait_closed()


@asynccontextmanager
async def quiet_server(app: web.Application) -> AsyncIterator[TestServer]:
    """A loopback TestServer without an access log: its request lines carry our query secrets."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(access_log=None)
    try:
        yield server
    finally:
        await server.close()


async def _refresh_post(session: aiohttp.ClientSession, url: str, refresh_token: str) -> None:
    form = urlencode({"grant_type": "refresh_token", "refresh_token": refresh_token})
    await send(session, "POST", url, data=form, headers=FORM_HEADERS)


async def expect_failure(
    session: aiohttp.ClientSession, url: str, secret: str, expected: type[IdpError]
) -> IdpError:
    """POST a refresh form carrying `secret`; the error must be `expected` and leak nothing."""
    with pytest.raises(IdpError) as info:
        await _refresh_post(session, url, secret)
    exc = info.value
    assert type(exc) is expected, f"{type(exc).__name__}: {exc}"
    where, _, query = url.partition("?")
    for text in (str(exc), repr(exc)):
        assert where in text
        assert query.partition("=")[2] not in text
        assert secret not in text
    return exc


@pytest.fixture
def query_url(new_secret: NewSecret) -> Callable[[str], str]:
    """Turn a base URL into one whose query string carries a secret-looking state."""
    return lambda base: f"{base}?state={new_secret('state')}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A short-timeout session, closed after the test."""
    async with short_session(connect=1.0, sock_read=0.5) as s:
        yield s


# --- never sent: IdpUnreachable ------------------------------------------------------------------


async def test_connection_refused_is_unreachable(
    session: aiohttp.ClientSession, new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A port nobody listens on refuses the connection: the request never left."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    url = query_url(f"http://127.0.0.1:{port}/o/token/")
    exc = await expect_failure(session, url, new_secret("rt"), IdpUnreachable)
    assert exc.retryable
    assert exc.outcome == "transient_error"


class _NoSuchHost(AbstractResolver):
    """Answers every lookup the way getaddrinfo does for a name under .invalid."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        del port, family
        self.lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def close(self) -> None:
        return None


async def test_dns_failure_is_unreachable(
    new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A name that does not resolve (.invalid) means the request never left.

    The resolver is a fake with getaddrinfo's answer: glibc would send a .invalid query to the
    configured nameserver, and the test must not depend on (or cause) network traffic.
    """
    resolver = _NoSuchHost()
    async with short_session(resolver=resolver) as session:
        url = query_url("http://idp.invalid/o/token/")
        exc = await expect_failure(session, url, new_secret("rt"), IdpUnreachable)
    assert resolver.lookups == ["idp.invalid"]
    assert "idp.invalid" in str(exc)


async def test_tls_handshake_failure_is_unreachable(
    session: aiohttp.ClientSession, new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """An https URL to a plain-HTTP server fails in the handshake, before any request is sent."""
    hits: list[str] = []

    async def token(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"access_token": "x"})

    app = web.Application()
    app.router.add_post("/o/token/", token)
    async with quiet_server(app) as server:
        url = query_url(f"https://127.0.0.1:{server.port}/o/token/")
        exc = await expect_failure(session, url, new_secret("rt"), IdpUnreachable)
    assert hits == []
    assert "SSL" in str(exc)


async def test_stalled_tls_handshake_is_an_unreachable_connect_timeout(
    new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A server that accepts TCP but never completes the TLS handshake times out the connect."""

    async def silent(
        reader: asyncio.StreamReader, _w: asyncio.StreamWriter, srv: RawServer
    ) -> None:
        await srv.release.wait()

    async with (
        RawServer(silent) as server,
        short_session(connect=0.3, sock_read=2.0) as session,
    ):
        url = query_url(server.url("/o/token/", scheme="https"))
        exc = await expect_failure(session, url, new_secret("rt"), IdpUnreachable)
    assert "timed out" in str(exc)
    assert server.requests == []


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A listening port whose accept queue is full, so a new connect hangs in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(address)
            _, writable, _ = select.select([], [filler], [], 0.2)
            if not writable:
                yield address[1]
                return
        pytest.skip("this kernel completes loopback connects past a full backlog")
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout_is_unreachable(
    full_backlog: int, new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A TCP connect that never completes (the listener's backlog is full) is unreachable."""
    async with short_session(connect=0.3, total=5.0) as session:
        url = query_url(f"http://127.0.0.1:{full_backlog}/o/token/")
        exc = await expect_failure(session, url, new_secret("rt"), IdpUnreachable)
    assert "timed out" in str(exc)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:99999/o/token/?code=c0de",
        "relative/token?code=c0de",
        "ftp://idp/t?code=c0de",
    ],
)
async def test_unusable_url_is_unreachable_and_hides_its_query(
    session: aiohttp.ClientSession, new_secret: NewSecret, url: str
) -> None:
    """A URL aiohttp refuses to send to (bad port, relative, not http) never left the broker."""
    exc = await expect_failure(session, url, new_secret("rt"), IdpUnreachable)
    assert "c0de" not in str(exc)


# --- maybe processed: IdpAmbiguous ---------------------------------------------------------------


async def test_read_timeout_after_the_request_was_sent_is_ambiguous(
    new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A server that reads the whole request and never answers leaves the outcome unknown."""

    async def mute(reader: asyncio.StreamReader, _w: asyncio.StreamWriter, srv: RawServer) -> None:
        await srv.read_request(reader)
        await srv.release.wait()

    secret = new_secret("rt")
    async with RawServer(mute) as server, short_session(sock_read=0.3) as session:
        exc = await expect_failure(session, query_url(server.url("/t")), secret, IdpAmbiguous)
    assert secret.encode() in server.requests[0]  # it was delivered: the IdP may have rotated
    assert "did not answer in time" in str(exc)
    assert exc.outcome == "ambiguous"
    assert not exc.retryable


async def test_reset_after_the_request_was_read_is_ambiguous(
    session: aiohttp.ClientSession, new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A connection reset (RST, SO_LINGER 0) after the server read the request is ambiguous."""

    async def reset(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: RawServer
    ) -> None:
        await srv.read_request(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    secret = new_secret("rt")
    async with RawServer(reset) as server:
        await expect_failure(session, query_url(server.url("/t")), secret, IdpAmbiguous)
    assert secret.encode() in server.requests[0]


@pytest.mark.parametrize("reads_first", [True, False], ids=["after-reading", "right-after-accept"])
async def test_server_closing_before_answering_is_ambiguous(
    session: aiohttp.ClientSession,
    new_secret: NewSecret,
    query_url: Callable[[str], str],
    reads_first: bool,
) -> None:
    """A server that closes without answering may have acted on what the client had written."""

    async def hang_up(
        reader: asyncio.StreamReader, _w: asyncio.StreamWriter, srv: RawServer
    ) -> None:
        if reads_first:
            await srv.read_request(reader)

    async with RawServer(hang_up) as server:
        await expect_failure(session, query_url(server.url("/t")), new_secret("rt"), IdpAmbiguous)
    assert server.connections == 1  # no silent retry on a fresh connection


async def test_truncated_body_is_ambiguous(
    session: aiohttp.ClientSession, new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A 200 whose body stops short of its Content-Length may carry tokens we never saw."""

    async def truncated(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: RawServer
    ) -> None:
        await srv.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
            b'{"access_token": "at-1", "refresh_token": "rt-'
        )
        await writer.drain()

    async with RawServer(truncated) as server:
        exc = await expect_failure(
            session, query_url(server.url("/t")), new_secret("rt"), IdpAmbiguous
        )
    assert "at-1" not in str(exc)
    assert "refresh_token" not in str(exc)


async def test_malformed_http_response_is_ambiguous_and_echoes_nothing(
    session: aiohttp.ClientSession, new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A response that is not HTTP is ambiguous; the message neither repeats it nor the query."""

    async def garbage(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: RawServer
    ) -> None:
        await srv.read_request(reader)
        writer.write(b"garbage echo-me\r\n\r\n")
        await writer.drain()

    async with RawServer(garbage) as server:
        exc = await expect_failure(
            session, query_url(server.url("/t")), new_secret("rt"), IdpAmbiguous
        )
    assert "echo-me" not in str(exc)


def _big_app(size: int, *, chunked: bool) -> web.Application:
    async def big(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=b"x" * size, content_type="application/json")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, size, 64 * 1024):
            await response.write(b"x" * min(64 * 1024, size - start))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/t", big)
    return app


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_max_body_bytes_is_ambiguous(
    session: aiohttp.ClientSession,
    new_secret: NewSecret,
    query_url: Callable[[str], str],
    chunked: bool,
) -> None:
    """A body one byte over MAX_BODY_BYTES is refused unread, as an ambiguous outcome."""
    async with quiet_server(_big_app(MAX_BODY_BYTES + 1, chunked=chunked)) as srv:
        url = query_url(f"http://127.0.0.1:{srv.port}/t")
        exc = await expect_failure(session, url, new_secret("rt"), IdpAmbiguous)
    assert str(MAX_BODY_BYTES) in str(exc)


async def test_body_of_exactly_max_body_bytes_is_read(session: aiohttp.ClientSession) -> None:
    """The cap is inclusive: a body of exactly MAX_BODY_BYTES arrives whole."""
    async with quiet_server(_big_app(MAX_BODY_BYTES, chunked=True)) as srv:
        response = await send(session, "POST", f"http://127.0.0.1:{srv.port}/t", data="")
    assert response.status == 200
    assert len(response.body) == MAX_BODY_BYTES


async def test_overall_timeout_while_trickling_is_ambiguous(
    new_secret: NewSecret, query_url: Callable[[str], str]
) -> None:
    """A body trickled faster than the read timeout but slower than the total one is ambiguous."""

    async def trickle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: RawServer
    ) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):  # 5 s at most; the client gives up after 1 s
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    async with RawServer(trickle) as server, short_session(total=1.0, sock_read=0.8) as session:
        exc = await expect_failure(
            session, query_url(server.url("/t")), new_secret("rt"), IdpAmbiguous
        )
    assert "1.0s" in str(exc)  # the session's own limit, not the production default


# --- what a response looks like ------------------------------------------------------------------


async def test_redirects_are_not_followed(session: aiohttp.ClientSession) -> None:
    """A 302 comes back as is: a token request must never be replayed to another URL."""
    hits: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app.router.add_post("/t", moved)
    app.router.add_route("*", "/elsewhere", moved)
    async with quiet_server(app) as server:
        response = await send(session, "POST", f"http://127.0.0.1:{server.port}/t", data="a=b")
    assert response.status == 302
    assert hits == ["/t"]


async def test_response_headers_are_case_insensitive(session: aiohttp.ClientSession) -> None:
    """Header names arrive in any case (HTTP/2 proxies send lowercase); lookups must not care."""

    async def lowercase(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: RawServer
    ) -> None:
        await srv.read_request(reader)
        writer.write(
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"retry-after: 7\r\ncontent-length: 2\r\n\r\n{}"
        )
        await writer.drain()

    async with RawServer(lowercase) as server:
        response = await send(session, "POST", server.url("/t"), data="")
    assert response.status == 429
    assert response.content_type == "application/json"
    assert response.retry_after() == 7.0
    assert response.body == b"{}"
