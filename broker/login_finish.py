"""How a claimed login ends: its tokens checked and stored as the grant, or failed and revoked.

Both ways of logging in (the code flow's redirect, the device grant's poller) claim their login
once and then hand it here. A claimed login always ends complete or failed, whatever breaks
after the claim: the CLI and GET /v1/logins wait on it, and it cannot be claimed again. A grant
written meanwhile by someone else (a refresh, another login finishing at the same moment) is
re-read and the login's tokens stored on top. Tokens a failed login got from the provider are
revoked there, when it can.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog

from broker.errors import BrokerError, ConflictError, IdpError, LoginError, TokenUnavailable
from broker.grants import GrantService, LoginResult
from broker.idp.client import ProviderClient
from broker.idp.metadata import ProviderMetadata
from broker.idp.tokens import ASSUMED_LIFETIME, TokenResponse, access_token_in_claim
from broker.model import Secret, TokenSet
from broker.store.logins import COMPLETE, DEVICE, FAILED, LoginRepository, PendingLogin

# How often a login's grant is re-read and written again when a concurrent write wins.
STORE_ATTEMPTS = 3
DISCARD_SECONDS = 10.0  # for revoking a failed login's tokens; the browser waits meanwhile
log = structlog.get_logger("broker.login")


async def reachable_metadata(client: ProviderClient) -> ProviderMetadata:
    """The provider's metadata; TokenUnavailable (try again) when discovery fails."""
    try:
        return await client.metadata()
    except IdpError as exc:
        raise TokenUnavailable(f"cannot reach provider {client.name}: {exc}", 30) from None


class LoginFinisher:
    """Turns a claimed login and the provider's tokens into a stored grant, or a failure."""

    def __init__(
        self,
        logins: LoginRepository,
        grants: GrantService,
        clients: Mapping[str, ProviderClient],
    ) -> None:
        self._logins = logins
        self._grants = grants
        self._clients = clients

    async def conclude(
        self,
        pending: PendingLogin,
        obtain: Callable[[list[TokenResponse]], Awaitable[LoginResult]],
        now: datetime,
    ) -> str | None:
        """Run a claimed login to its end; None when complete, else why it failed.

        `obtain` appends the tokens the provider issued to its list as soon as it has them, so
        a login that fails afterwards can have them revoked.
        """
        grant = f"{pending.provider}/{pending.user}"
        issued: list[TokenResponse] = []
        try:
            result = await obtain(issued)
            await self._store(result, now)
        except BrokerError as exc:
            reason = str(exc)
        except Exception as exc:  # a claimed login must end, whatever broke; the log has the rest
            log.exception("login_error", grant=grant, login=pending.id)
            reason = f"the broker could not finish it ({type(exc).__name__}); see its log"
        else:
            await self._logins.finish(pending.id, COMPLETE, None, now)
            log.info("login_complete", grant=grant, login=pending.id, method=pending.method)
            return None
        await self._logins.finish(pending.id, FAILED, reason, now)
        log.warning("login_failed", grant=grant, login=pending.id, reason=reason)
        if issued:
            await self.discard(pending.provider, issued[0], grant)
        return reason

    async def discard(self, provider: str, tokens: TokenResponse, grant: str) -> None:
        """Revoke the tokens of a login that failed after the provider issued them (best effort).

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

    async def result(
        self, pending: PendingLogin, tokens: TokenResponse, now: datetime
    ) -> LoginResult:
        """The grant a login's tokens make, once the ID token (if any) passes every check."""
        provider = pending.provider
        client = self._clients.get(provider)
        if client is None:  # the config changed since the login started
            raise LoginError(f"provider {provider} is no longer configured")
        from_claim = client.config.access_token_from.claim
        claims: dict[str, Any] = {}
        if tokens.id_token is not None:
            claims = await client.check_id_token(
                tokens.id_token,
                nonce=pending.nonce,
                now=now,
                access_token=None if from_claim else tokens.access_token,
            )
        elif client.wants_id_token and pending.method == DEVICE:
            # Providers need not issue an ID token in this grant (django-oauth-toolkit does
            # not); the account is then the one the new access token speaks for.
            claims = await _userinfo_claims(client, tokens)
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


async def _userinfo_claims(client: ProviderClient, tokens: TokenResponse) -> dict[str, Any]:
    """The userinfo claims for a login without an ID token; they must name the `sub`."""
    if tokens.access_token is None:
        raise LoginError("the token response carries neither an ID token nor an access_token")
    try:
        claims = await client.userinfo(tokens.access_token)
    except IdpError as exc:
        raise LoginError(
            f"the provider sent no ID token, and asking its userinfo endpoint who logged in "
            f"failed: {exc}"
        ) from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise LoginError("the provider sent no ID token, and its userinfo answer has no sub")
    return claims
