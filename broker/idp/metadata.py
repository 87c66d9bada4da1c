"""Provider metadata: OIDC discovery, RFC 8414, and the config's explicit endpoints on top."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from broker.config import ProviderConfig
from broker.errors import IdpError
from broker.idp.http import send


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """Where a provider's endpoints are, and what it promises."""

    issuer: str | None
    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str | None = None
    jwks_uri: str | None = None
    userinfo_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    introspection_endpoint: str | None = None
    iss_parameter_supported: bool = False
    id_token_algorithms: tuple[str, ...] = ("RS256",)


def rfc8414_url(issuer: str) -> str:
    """RFC 8414's well-known URL: the suffix goes between the host and the issuer's path."""
    parts = urlsplit(issuer)
    path = "/.well-known/oauth-authorization-server" + parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _path_suffix_url(issuer: str) -> str:
    # What several servers (django-oauth-toolkit among them) serve instead of RFC 8414's form.
    return issuer.rstrip("/") + "/.well-known/oauth-authorization-server"


async def _fetch(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    response = await send(session, "GET", url, headers={"Accept": "application/json"})
    if response.status == 404:
        return None
    if response.status != 200:
        raise IdpError(f"{url} answered {response.status}", retry_after=response.retry_after())
    try:
        document = json.loads(response.body)
    except (ValueError, RecursionError):  # RecursionError: arrays nested past the limit
        raise IdpError(f"{url} is not JSON") from None
    if not isinstance(document, dict):
        raise IdpError(f"{url} is not a JSON object")
    return document


_OPTIONAL_ENDPOINTS = ("introspection_endpoint", "device_authorization_endpoint")


async def _oauth_metadata(session: aiohttp.ClientSession, issuer: str) -> dict[str, Any] | None:
    """The RFC 8414 document, at its own location or the path-suffix one; None when absent."""
    base = issuer.rstrip("/")
    for url in (rfc8414_url(base), _path_suffix_url(base)):
        oauth = await _fetch(session, url)
        if oauth is not None:
            _check_issuer(oauth, issuer, "oauth-authorization-server")
            return oauth
    return None


async def discover(session: aiohttp.ClientSession, provider: ProviderConfig) -> ProviderMetadata:
    """The provider's metadata: discovery documents merged under the config's explicit keys."""
    found: dict[str, Any] = {}
    if provider.issuer is not None:
        issuer = provider.issuer.rstrip("/")
        oidc = await _fetch(session, issuer + "/.well-known/openid-configuration")
        if oidc is not None:
            _check_issuer(oidc, provider.issuer, "openid-configuration")
            found.update(oidc)
        # OpenID discovery documents often omit endpoints that the OAuth metadata lists
        # (revocation, introspection, device authorization), so read that too when one is
        # missing. Without an OpenID document it is required; beside one, only the optional
        # endpoints are at stake, so a failure to read it changes nothing.
        if oidc is None or "revocation_endpoint" not in found:
            found = {**(await _oauth_metadata(session, provider.issuer) or {}), **found}
        elif any(key not in found for key in _OPTIONAL_ENDPOINTS):
            with contextlib.suppress(IdpError):
                found = {**(await _oauth_metadata(session, provider.issuer) or {}), **found}
        if not found:
            raise IdpError(f"no discovery document found for issuer {provider.issuer}")
    explicit = {
        "authorization_endpoint": provider.authorization_endpoint,
        "token_endpoint": provider.token_endpoint,
        "revocation_endpoint": provider.revocation_endpoint,
        "jwks_uri": provider.jwks_uri,
        "userinfo_endpoint": provider.userinfo_endpoint,
        "device_authorization_endpoint": provider.device_authorization_endpoint,
        "introspection_endpoint": provider.introspection_endpoint,
    }
    found.update({key: value for key, value in explicit.items() if value is not None})
    for required in ("authorization_endpoint", "token_endpoint"):
        if not isinstance(found.get(required), str):
            raise IdpError(f"provider {provider.name} has no {required}; set it in the config")
    algorithms = found.get("id_token_signing_alg_values_supported")
    # ID tokens carry the issuer as discovery spells it, which was checked above to equal the
    # config's up to a trailing slash: a config written with one must still match them.
    confirmed = _str(found.get("issuer")) if provider.issuer is not None else None
    return ProviderMetadata(
        issuer=confirmed or provider.issuer,
        authorization_endpoint=found["authorization_endpoint"],
        token_endpoint=found["token_endpoint"],
        revocation_endpoint=_str(found.get("revocation_endpoint")),
        jwks_uri=_str(found.get("jwks_uri")),
        userinfo_endpoint=_str(found.get("userinfo_endpoint")),
        device_authorization_endpoint=_str(found.get("device_authorization_endpoint")),
        introspection_endpoint=_str(found.get("introspection_endpoint")),
        iss_parameter_supported=found.get("authorization_response_iss_parameter_supported") is True,
        id_token_algorithms=_algorithms(algorithms),
    )


# Asymmetric algorithms only: an HS256 ID token would be signed with the client secret, and
# a public client has none; "none" is never acceptable.
ALLOWED_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


def _algorithms(advertised: object) -> tuple[str, ...]:
    if not isinstance(advertised, list):
        return ("RS256",)
    allowed = tuple(a for a in advertised if a in ALLOWED_ALGORITHMS)
    return allowed or ("RS256",)


def _check_issuer(document: dict[str, Any], issuer: str, name: str) -> None:
    # OIDC Discovery 4.3 / RFC 8414 3.3: the document must name the issuer we asked for.
    if str(document.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise IdpError(
            f"the {name} document names issuer {document.get('issuer')!r}, "
            f"not the configured {issuer!r}"
        )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
