"""One provider: its metadata, keys and the calls the broker makes to it."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import structlog
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from broker.config import ProviderConfig
from broker.errors import IdpError, IdpNotProcessed, IdpUnreachable, IdTokenInvalid, StartupError
from broker.idp.device import (
    GRANT_TYPE,
    DeviceAuthorization,
    PollOutcome,
    parse_device_authorization,
    poll_outcome,
    unanswered,
)
from broker.idp.http import send
from broker.idp.idtoken import unverified_kid, validate_id_token
from broker.idp.metadata import ProviderMetadata, discover
from broker.idp.tokens import TokenResponse, error_for, parse_token_response
from broker.model import Secret

METADATA_TTL_SECONDS = 3600.0
JWKS_REFETCH_INTERVAL = 30.0  # an unknown kid refetches at most this often
# After a failed discovery fetch, callers queued behind it (and those arriving soon after) get
# the same failure instead of each trying again: one attempt per interval, not one per grant.
DISCOVERY_RETRY_SECONDS = 5.0
log = structlog.get_logger("broker.idp")


@dataclass(frozen=True, slots=True)
class Pkce:
    """A PKCE verifier and its S256 challenge."""

    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        """A fresh verifier of 64 URL-safe characters (RFC 7636 allows 43 to 128)."""
        verifier = secrets.token_urlsafe(48)
        return cls(verifier=verifier, challenge=create_s256_code_challenge(verifier))


def read_client_secret(path: Path) -> Secret:
    """The client secret from its file, stripped of surrounding whitespace."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise StartupError(f"cannot read client secret file {path}: {exc.strerror}") from None
    if not value:
        raise StartupError(f"client secret file {path} is empty")
    return Secret(value)


class ProviderClient:
    """Discovery, keys, authorize URLs, code exchange, refresh and revocation for one provider."""

    def serves(self, config: ProviderConfig, client_secret: Secret | None) -> bool:
        """Whether this client is the one `config` with `client_secret` would build."""
        return self.config == config and self._secret == client_secret

    def __init__(
        self,
        config: ProviderConfig,
        session: aiohttp.ClientSession,
        client_secret: Secret | None = None,
    ) -> None:
        self.config = config
        self._session = session
        self._secret = client_secret
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = 0.0
        self._metadata_failure: tuple[float, IdpError] | None = None
        self._metadata_lock = asyncio.Lock()
        self._keys: KeySet | None = None
        self._keys_at = 0.0
        self._keys_lock = asyncio.Lock()

    @property
    def name(self) -> str:
        """The provider's key in the config."""
        return self.config.name

    async def metadata(self) -> ProviderMetadata:
        """Endpoints from discovery and the config, cached for an hour.

        A refetch that fails keeps the metadata already held (and tries again after
        DISCOVERY_RETRY_SECONDS); with none held, the failure is raised, and repeated to every
        caller for DISCOVERY_RETRY_SECONDS rather than fetched again by each.
        """
        async with self._metadata_lock:
            now = time.monotonic()
            if self._metadata is not None and now - self._metadata_at < METADATA_TTL_SECONDS:
                return self._metadata
            if self._metadata_failure is not None:
                failed_at, error = self._metadata_failure
                if now - failed_at < DISCOVERY_RETRY_SECONDS:
                    if self._metadata is not None:
                        return self._metadata
                    raise error
            try:
                self._metadata = await discover(self._session, self.config)
            except IdpError as exc:
                self._metadata_failure = (time.monotonic(), exc)
                if self._metadata is None:
                    raise
                log.warning(
                    "discovery_refetch_failed",
                    provider=self.name,
                    reason=str(exc),
                    detail="keeping the metadata already held",
                )
                return self._metadata
            self._metadata_at = time.monotonic()
            self._metadata_failure = None
            return self._metadata

    @property
    def needs_keys_to_refresh(self) -> bool:
        """Whether a refresh response's ID token is checked: the provider speaks OpenID Connect
        (and for some, the served access token is a claim of that ID token)."""
        return self.wants_id_token or self.config.access_token_from.claim is not None

    async def prepare(self) -> None:
        """Resolve everything a refresh needs that can fail without spending its token.

        Called before the intent is written: a failure here means the refresh token never
        left (ROTATION.md invariant 4, "never sent"). Metadata and, for an OpenID Connect
        provider, the signing keys that check the ID token a refresh returns; both are cached,
        and a failed refetch falls back to what is held.
        """
        metadata = await self.metadata()
        if self.needs_keys_to_refresh and metadata.jwks_uri is not None:
            await self._key_set(metadata.jwks_uri, None)

    @property
    def can_introspect(self) -> bool:
        """Whether the prepared metadata names an introspection endpoint (RFC 7662)."""
        return self._metadata is not None and self._metadata.introspection_endpoint is not None

    def prepared_metadata(self) -> ProviderMetadata:
        """The metadata `prepare` resolved, without any I/O; IdpUnreachable when there is none."""
        if self._metadata is None:
            raise IdpUnreachable(f"provider {self.name}: discovery has not succeeded yet")
        return self._metadata

    async def introspect(self, token: Secret, hint: str = "refresh_token") -> bool | None:
        """Whether the provider holds `token` active (RFC 7662); None when it offers this client
        no introspection (no endpoint, or it refuses the client).

        Transient failures raise IdpError: the answer is not known yet.
        """
        metadata = self.prepared_metadata()
        if metadata.introspection_endpoint is None:
            return None
        url, headers, body = self._authenticate(
            metadata.introspection_endpoint, {"token": token.reveal(), "token_type_hint": hint}
        )
        response = await send(self._session, "POST", url, data=body, headers=headers)
        if response.status in (401, 403):
            return None  # this client may not introspect
        if response.status != 200:
            raise error_for(response, "the introspection endpoint")
        try:
            answer = json.loads(response.body)
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            raise IdpNotProcessed("the introspection endpoint did not answer with {active: bool}")
        client_id = answer.get("client_id")
        if answer["active"] and client_id not in (None, self.config.client_id):
            # Active for another client: not the token this client holds.
            return False
        return bool(answer["active"])

    def authorize_url(
        self, metadata: ProviderMetadata, *, state: str, nonce: str | None, pkce: Pkce
    ) -> str:
        """Where to send the user: code flow, S256 PKCE, state, and a nonce when OIDC."""
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.config.redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
        }
        if nonce is not None:
            params["nonce"] = nonce
        endpoint = metadata.authorization_endpoint
        return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)

    @property
    def wants_id_token(self) -> bool:
        """Whether logins ask for OpenID Connect (and so for a nonce and an ID token)."""
        return "openid" in self.config.scopes

    async def exchange_code(self, code: str, verifier: str) -> TokenResponse:
        """Trade an authorization code and the PKCE verifier for tokens."""
        return await self._token_call(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.config.redirect_uri,
                "code_verifier": verifier,
            }
        )

    async def device_authorization(self, endpoint: str) -> DeviceAuthorization:
        """Ask for a device code and a user code (RFC 8628 section 3.1); no PKCE in this grant."""
        url, headers, body = self._authenticate(endpoint, {"scope": " ".join(self.config.scopes)})
        response = await send(self._session, "POST", url, data=body, headers=headers)
        return parse_device_authorization(response)

    async def poll_device(self, device_code: Secret, interval: int) -> PollOutcome:
        """Ask the token endpoint once whether the person has approved (section 3.4)."""
        form = {"grant_type": GRANT_TYPE, "device_code": device_code.reveal()}
        try:
            metadata = await self.metadata()
            url, headers, body = self._authenticate(metadata.token_endpoint, form)
            response = await send(self._session, "POST", url, data=body, headers=headers)
        except IdpError as exc:
            # Nothing is spent by asking again: a device code is no refresh token.
            return unanswered(interval, str(exc))
        return poll_outcome(response, interval, self.config.client_id)

    async def userinfo(self, access_token: Secret) -> dict[str, Any]:
        """The UserInfo answer (OpenID Connect Core 5.3) for this access token."""
        metadata = await self.metadata()
        if metadata.userinfo_endpoint is None:
            raise IdpError(f"provider {self.name} has no userinfo_endpoint")
        headers = {"Authorization": f"Bearer {access_token.reveal()}", "Accept": "application/json"}
        response = await send(self._session, "GET", metadata.userinfo_endpoint, headers=headers)
        if response.status != 200:
            raise IdpError(f"{metadata.userinfo_endpoint.split('?')[0]} answered {response.status}")
        try:
            claims = json.loads(response.body)
        except (ValueError, RecursionError):
            claims = None
        if not isinstance(claims, dict):
            raise IdpError("the userinfo endpoint answered with something other than a JSON object")
        return claims

    async def refresh(self, refresh_token: Secret) -> TokenResponse:
        """Spend a refresh token, with the metadata `prepare` resolved (no discovery here).

        No `scope` is sent: some providers reject it on refresh.
        """
        return await self._token_call(
            {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()},
            prepared=True,
        )

    async def revoke_grant(self, refresh_token: Secret | None, access_token: Secret | None) -> bool:
        """Revoke a grant's tokens: the refresh token (RFC 7009 takes its access tokens with
        it), else the access token; False when there is nothing to revoke or no endpoint."""
        if refresh_token is not None:
            return await self.revoke(refresh_token, "refresh_token")
        if access_token is not None:
            return await self.revoke(access_token, "access_token")
        return False

    async def revoke(self, token: Secret, hint: str = "refresh_token") -> bool:
        """Revoke at the IdP (RFC 7009); False when it has no revocation endpoint."""
        metadata = await self.metadata()
        if metadata.revocation_endpoint is None:
            return False
        url, headers, body = self._authenticate(
            metadata.revocation_endpoint, {"token": token.reveal(), "token_type_hint": hint}
        )
        response = await send(self._session, "POST", url, data=body, headers=headers)
        if response.status != 200:
            raise error_for(response, "the revocation endpoint")
        return True

    async def check_id_token(
        self,
        id_token: Secret,
        *,
        nonce: str | None,
        now: datetime,
        access_token: Secret | None = None,
    ) -> dict[str, Any]:
        """The validated claims of an ID token from this provider."""
        metadata = await self.metadata()
        if metadata.jwks_uri is None:
            raise IdTokenInvalid(f"provider {self.name} has no jwks_uri to check ID tokens with")
        kid = unverified_kid(id_token)
        keys = await self._key_set(metadata.jwks_uri, kid)
        return validate_id_token(
            id_token,
            keys,
            issuer=metadata.issuer,
            client_id=self.config.client_id,
            nonce=nonce,
            algorithms=metadata.id_token_algorithms,
            now=now,
            access_token=access_token,
        )

    async def _key_set(self, jwks_uri: str, kid: str | None) -> KeySet:
        async with self._keys_lock:
            known = self._keys is not None and (kid is None or _has_kid(self._keys, kid))
            may_refetch = time.monotonic() - self._keys_at >= JWKS_REFETCH_INTERVAL
            if self._keys is None or (not known and may_refetch):
                self._keys = await self._fetch_keys(jwks_uri)
                self._keys_at = time.monotonic()
            if kid is not None and not _has_kid(self._keys, kid):
                raise IdTokenInvalid(f"ID token check failed: unknown signing key id {kid!r}")
            return self._keys

    async def _fetch_keys(self, jwks_uri: str) -> KeySet:
        response = await send(
            self._session, "GET", jwks_uri, headers={"Accept": "application/json"}
        )
        if response.status != 200:
            raise IdpError(f"{jwks_uri} answered {response.status}")
        try:
            return KeySet.import_key_set(json.loads(response.body))
        except (ValueError, RecursionError, JoseError, TypeError, KeyError):
            raise IdpError(f"{jwks_uri} is not a usable JWK set") from None

    async def _token_call(self, form: dict[str, str], *, prepared: bool = False) -> TokenResponse:
        # A refresh uses only what `prepare` resolved: no discovery between intent and send.
        metadata = self.prepared_metadata() if prepared else await self.metadata()
        url, headers, body = self._authenticate(metadata.token_endpoint, form)
        response = await send(self._session, "POST", url, data=body, headers=headers)
        return parse_token_response(response)

    def _authenticate(self, url: str, form: dict[str, str]) -> tuple[str, dict[str, str], str]:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        secret = None if self._secret is None else self._secret.reveal()
        auth = ClientAuth(self.config.client_id, secret, self.config.client_auth)
        uri, headers, body = auth.prepare("POST", url, headers, urlencode(form))
        return str(uri), dict(headers), str(body)


def _has_kid(keys: KeySet, kid: str) -> bool:
    return any(key.kid == kid for key in keys.keys)
