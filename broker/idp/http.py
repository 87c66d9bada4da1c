"""The HTTP transport to identity providers, and what each failure means for rotation.

Whether a failed token request may have been processed decides whether the refresh token it
carried may still be unspent (ROTATION.md, invariant 4):

    never sent:  connection refused, DNS, TLS handshake, connect timeout,
                 a URL aiohttp refuses to send to                          -> IdpUnreachable
    maybe seen:  read timeout, reset or disconnect after sending,
                 an overall timeout, a truncated body                      -> IdpAmbiguous

The session's connector closes every connection after its response (`force_close`): a pooled
keep-alive connection that the IdP has closed would otherwise fail *after* the request was
written, and turn a harmless retry into an ambiguous outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from broker.errors import IdpAmbiguous, IdpUnreachable

MAX_BODY_BYTES = 256 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10, sock_connect=10, sock_read=20)
# The longest one IdP call can take; leases on a grant must outlive it.
MAX_CALL_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete, size-capped response."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        """The media type without parameters."""
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()

    def retry_after(self) -> float | None:
        """Retry-After in seconds when given as a number of seconds."""
        value = self.headers.get("Retry-After", "").strip()
        return float(value) if value.isdigit() else None


def new_session() -> aiohttp.ClientSession:
    """The one session all provider calls share."""
    connector = aiohttp.TCPConnector(force_close=True, limit=64)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=TIMEOUT,
        headers={"User-Agent": "token-broker"},
        raise_for_status=False,
    )


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    data: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> HttpResponse:
    """Send one request; raise IdpUnreachable or IdpAmbiguous, never a library error."""
    where = _where(url)
    try:
        async with session.request(
            method, url, data=data, headers=headers, allow_redirects=False
        ) as response:
            body = await _read_capped(response)
            return HttpResponse(response.status, dict(response.headers), body)
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError):
        # Refused before any connection; its text is the whole URL, query string included.
        raise IdpUnreachable(f"{where} is not a URL the broker can send to") from None
    except aiohttp.ClientConnectorError as exc:
        raise IdpUnreachable(f"cannot connect to {where}: {_reason(exc)}") from None
    except aiohttp.ConnectionTimeoutError:
        raise IdpUnreachable(f"connecting to {where} timed out") from None
    except aiohttp.SocketTimeoutError:
        raise IdpAmbiguous(f"{where} did not answer in time after the request was sent") from None
    except TimeoutError:
        limit = session.timeout.total
        raise IdpAmbiguous(f"the call to {where} took longer than {limit}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise IdpAmbiguous(
            f"the connection to {where} failed after sending: {_reason(exc)}"
        ) from None


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(16 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise IdpAmbiguous(
                f"{_where(str(response.url))} sent more than {MAX_BODY_BYTES} bytes; refusing it"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _where(url: str) -> str:
    # Scheme, host and path only: a query string could carry a code or a token.
    return url.split("?", 1)[0]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        # Raised for a response that is not valid HTTP; its text names the full URL (query
        # string included) and echoes the server's bytes.
        return f"{type(exc).__name__}: the response is not valid HTTP"
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
