"""Logging a user in: the authorization-code flow with PKCE, from POST /v1/logins to the grant.

start()     state, nonce and PKCE verifier are made and stored sealed; the authorize URL
            carries state, nonce, the S256 challenge
complete()  the redirect's state claims the login once; `error`, a foreign `iss`, a failed
            exchange or a bad ID token end it as failed and store nothing; otherwise the
            grant is stored (a different `sub` than the grant holds needs `force`); tokens
            a failed login got from the exchange are revoked at the provider, if it can

A claimed login always ends complete or failed, whatever breaks after the claim: the CLI and
GET /v1/logins wait on it, and its state cannot be claimed again. A grant written meanwhile by
someone else (a refresh, another login finishing at the same moment) is re-read and the login's
tokens stored on top.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from broker.errors import (
    BrokerError,
    ConflictError,
    GrantNotFound,
    IdpError,
    LoginError,
    TokenUnavailable,
)
from broker.grants import GrantService, LoginResult
from broker.idp.client import Pkce, ProviderClient
from broker.idp.tokens import ASSUMED_LIFETIME, TokenResponse, access_token_in_claim
from broker.model import Secret, TokenSet
from broker.store.logins import COMPLETE, FAILED, LoginRecord, LoginRepository, PendingLogin

LOGIN_TTL = timedelta(minutes=10)
# How often a login's grant is re-read and written again when a concurrent write wins.
STORE_ATTEMPTS = 3
DISCARD_SECONDS = 10.0  # for revoking a failed login's tokens; the browser waits meanwhile
log = structlog.get_logger("broker.login")


@dataclass(frozen=True, slots=True)
class LoginStarted:
    """What POST /v1/logins answers."""

    login_id: str
    authorize_url: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class CallbackOutcome:
    """How a redirect ended, for the page the browser shows."""

    ok: bool
    message: str


class LoginService:
    """Starts logins and completes them when the IdP redirects back."""

    def __init__(
        self,
        logins: LoginRepository,
        grants: GrantService,
        clients: Mapping[str, ProviderClient],
    ) -> None:
        self._logins = logins
        self._grants = grants
        self._clients = clients

    async def start(self, provider: str, user: str, force: bool, now: datetime) -> LoginStarted:
        """Create a pending login and the URL to send the user to."""
        self._grants.check_address(provider, user)
        client = self._clients[provider]
        try:
            metadata = await client.metadata()
        except IdpError as exc:
            raise TokenUnavailable(f"cannot reach provider {provider}: {exc}", 30) from None
        login_id = secrets.token_urlsafe(24)
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32) if client.wants_id_token else None
        pkce = Pkce.new()
        expires_at = now + LOGIN_TTL
        await self._logins.insert(
            login_id=login_id,
            provider=provider,
            user=user,
            state=state,
            nonce=nonce,
            code_verifier=pkce.verifier,
            force=force,
            now=now,
            expires_at=expires_at,
        )
        log.info("login_started", grant=f"{provider}/{user}", login=login_id, force=force)
        url = client.authorize_url(metadata, state=state, nonce=nonce, pkce=pkce)
        return LoginStarted(login_id=login_id, authorize_url=url, expires_at=expires_at)

    async def status(self, login_id: str, now: datetime) -> LoginRecord:
        """The progress of a login."""
        record = await self._logins.get(login_id, now)
        if record is None:
            raise GrantNotFound(f"no login {login_id!r}")
        return record

    async def complete(self, params: Mapping[str, str], now: datetime) -> CallbackOutcome:
        """Handle the IdP's redirect; nothing is stored unless every check passes."""
        state = params.get("state")
        if not state:
            return CallbackOutcome(False, "The redirect carries no state; start a new login.")
        try:
            pending = await self._logins.claim(state, now)
        except LoginError as exc:
            log.warning("login_callback_refused", reason=str(exc))
            return CallbackOutcome(False, str(exc).capitalize() + ".")
        grant = f"{pending.provider}/{pending.user}"
        issued: list[TokenResponse] = []  # what the code exchange returned, if it ran
        try:
            result = await self._finish(pending, params, now, issued)
            await self._store(result, now)
        except BrokerError as exc:
            reason = str(exc)
        except Exception as exc:  # a claimed login must end, whatever broke; the log has the rest
            log.exception("login_error", grant=grant, login=pending.id)
            reason = f"the broker could not finish it ({type(exc).__name__}); see its log"
        else:
            await self._logins.finish(pending.id, COMPLETE, None, now)
            log.info("login_complete", grant=grant, login=pending.id)
            return CallbackOutcome(
                True, f"Signed in: {grant} is stored. You may close this window."
            )
        await self._logins.finish(pending.id, FAILED, reason, now)
        log.warning("login_failed", grant=grant, login=pending.id, reason=reason)
        if issued:
            await self._discard(pending.provider, issued[0], grant)
        return CallbackOutcome(False, f"Login for {grant} failed: {reason}.")

    async def _discard(self, provider: str, tokens: TokenResponse, grant: str) -> None:
        """Revoke the tokens of a login that failed after its code exchange (best effort).

        They were issued, but the broker keeps nothing of a failed login: left alone, a refresh
        token nobody holds would stay valid at the provider until it expires.
        """
        client = self._clients.get(provider)
        if client is None:
            return
        try:
            async with asyncio.timeout(DISCARD_SECONDS):
                revoked = await client.revoke_grant(tokens.refresh_token, tokens.access_token)
        except (BrokerError, TimeoutError) as exc:
            log.warning("login_tokens_not_revoked", grant=grant, error=str(exc) or "timed out")
            return
        if revoked:
            log.info("login_tokens_revoked", grant=grant)

    async def _store(self, result: LoginResult, now: datetime) -> None:
        """Store the login's grant; when a concurrent write wins, re-read the grant and retry."""
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                await self._grants.store_login(result, now)
                return
            except ConflictError:
                if attempt == STORE_ATTEMPTS:
                    raise
                log.info("login_store_retry", grant=f"{result.provider}/{result.user}")

    async def _finish(
        self,
        pending: PendingLogin,
        params: Mapping[str, str],
        now: datetime,
        issued: list[TokenResponse],
    ) -> LoginResult:
        provider, nonce = pending.provider, pending.nonce
        client = self._clients.get(provider)
        if client is None:  # the config changed since the login started
            raise LoginError(f"provider {provider} is no longer configured")
        if "error" in params:
            description = params.get("error_description")
            detail = f" ({description[:200]})" if description else ""
            raise LoginError(f"the provider answered {params['error'][:64]}{detail}")
        metadata = await client.metadata()
        iss = params.get("iss")
        # RFC 9207: an `iss` naming another issuer means the response came from a mix-up.
        if iss is not None and iss.rstrip("/") != (metadata.issuer or "").rstrip("/"):
            raise LoginError("the redirect's iss does not name this provider's issuer")
        if iss is None and metadata.iss_parameter_supported:
            raise LoginError("the provider promises an iss parameter but the redirect has none")
        code = params.get("code")
        if not code:
            raise LoginError("the redirect carries no authorization code")
        tokens = await client.exchange_code(code, pending.code_verifier)
        issued.append(tokens)
        from_claim = client.config.access_token_from.claim
        claims: dict[str, Any] = {}
        if tokens.id_token is not None:
            claims = await client.check_id_token(
                tokens.id_token,
                nonce=nonce,
                now=now,
                access_token=None if from_claim else tokens.access_token,
            )
        elif client.wants_id_token:
            raise LoginError("the provider returned no ID token although openid was asked for")
        access_token, token_type, expires_in = _access_token(tokens, claims, from_claim)
        if from_claim is not None:
            claims.pop(from_claim, None)  # the token is kept sealed as the access token
        sub = claims.get("sub")
        return LoginResult(
            provider=provider,
            user=pending.user,
            sub=sub if isinstance(sub, str) else None,
            tokens=TokenSet(
                refresh_token=tokens.refresh_token,
                access_token=access_token,
                id_token=tokens.id_token,
            ),
            token_type=token_type,
            scopes=tokens.scope if tokens.scope is not None else client.config.scopes,
            access_expires_at=now + timedelta(seconds=expires_in or ASSUMED_LIFETIME),
            claims=claims,
            force=pending.force,
        )


def _access_token(
    tokens: TokenResponse, claims: Mapping[str, Any], claim: str | None
) -> tuple[Secret, str, int | None]:
    """The access token, its type and lifetime: from the response, or from an ID token claim."""
    if claim is None:
        if tokens.access_token is None:
            raise LoginError("the token response carries no access_token")
        return tokens.access_token, tokens.token_type, tokens.expires_in
    return access_token_in_claim(claims, claim)  # IdpError: the login fails with its message
