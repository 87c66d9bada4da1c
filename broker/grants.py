"""The grant service: what the API asks for, answered from the cache and kept in the store.

The token path (`token`) touches memory only. Writes go to the store first and reach the cache
only after their commit (persist before publish).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from broker.cache import GrantCache
from broker.config import ProviderConfig
from broker.errors import BadRequest, GrantNotFound, IdpError, ReauthRequired, TokenUnavailable
from broker.idp.client import ProviderClient
from broker.metrics import GrantGauges
from broker.model import (
    PROVIDER_RE,
    USER_RE,
    Grant,
    GrantState,
    GrantSummary,
    Secret,
    TokenSet,
    grant_name,
)
from broker.store.repository import GrantRepository

# How long a caller should wait before asking again for a grant whose token has expired.
RETRY_AFTER_SECONDS = 30


@dataclass(frozen=True, slots=True)
class Import:
    """A refresh token (and perhaps a current access token) obtained outside the broker."""

    provider: str
    user: str
    refresh_token: Secret
    access_token: Secret | None = None
    expires_in: int | None = None
    scope: tuple[str, ...] | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A completed login, ready to become (or replace) a grant."""

    provider: str
    user: str
    sub: str | None
    tokens: TokenSet
    token_type: str
    scopes: tuple[str, ...]
    access_expires_at: datetime
    claims: dict[str, Any]
    force: bool


class GrantService:
    """Grants as callers and admins see them."""

    def __init__(
        self,
        repository: GrantRepository,
        providers: Mapping[str, ProviderConfig],
        clients: Mapping[str, ProviderClient] | None = None,
    ) -> None:
        self._repository = repository
        self._providers = providers
        self._clients = clients or {}
        self._cache = GrantCache()

    async def load(self) -> int:
        """Fill the cache from the store; how many grants it holds."""
        for grant in await self._repository.all():
            self._cache.put(grant)
        return len(self._cache)

    def token(self, provider: str, user: str, now: datetime) -> Grant:
        """The grant whose access token may be served now, or the reason it may not."""
        grant = self._cache.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        if grant.state is not GrantState.ACTIVE:
            reason = grant.last_error or grant.state.value
            raise ReauthRequired(f"grant {grant.name} needs a new login: {reason}")
        if grant.access_ttl(now) > 0:
            return grant
        if grant.tokens.refresh_token is None:
            raise ReauthRequired(
                f"grant {grant.name} has no refresh token and its access token expired; "
                "log in again"
            )
        raise TokenUnavailable(
            f"grant {grant.name} has no valid access token right now", RETRY_AFTER_SECONDS
        )

    async def summaries(self) -> list[GrantSummary]:
        """Every grant, without secrets, as the store has it."""
        return [GrantSummary.of(grant) for grant in await self._repository.all()]

    async def summary(self, provider: str, user: str) -> GrantSummary:
        """One grant without secrets."""
        grant = await self._repository.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        return GrantSummary.of(grant)

    async def import_grant(self, request: Import, now: datetime) -> tuple[GrantSummary, bool]:
        """Store an imported grant; returns its summary and whether it is new."""
        provider = self.check_address(request.provider, request.user)
        if request.access_token is not None and request.expires_in is None:
            raise BadRequest("expires_in is required with access_token")
        expires_at = (
            None if request.expires_in is None else now + timedelta(seconds=request.expires_in)
        )
        if request.access_token is None:
            expires_at = None
        tokens = TokenSet(refresh_token=request.refresh_token, access_token=request.access_token)
        scopes = request.scope if request.scope is not None else provider.scopes
        existing = await self._repository.get(request.provider, request.user)
        if existing is None:
            fresh = Grant(
                id="",
                provider=request.provider,
                user=request.user,
                state=GrantState.ACTIVE,
                generation=0,
                tokens=tokens,
                scopes=scopes,
                access_expires_at=expires_at,
            )
            grant = await self._repository.insert(fresh, now)
        elif request.force:
            updated = replace(
                existing,
                state=GrantState.ACTIVE,
                tokens=tokens,
                scopes=scopes,
                sub=None,
                claims={},
                access_expires_at=expires_at,
                next_refresh_at=None,
                last_error=None,
            )
            grant = await self._repository.replace_tokens(updated, existing.generation, now)
        else:
            raise BadRequest(
                f"grant {existing.name} already exists; import with force to replace its tokens"
            )
        self._cache.put(grant)
        return GrantSummary.of(grant), existing is None

    def gauges(self, now: datetime) -> GrantGauges:
        """Counts by provider and state, and the least access-token life per provider."""
        by_state: Counter[tuple[str, str]] = Counter()
        min_ttl: dict[str, float] = {}
        for grant in self._cache:
            by_state[(grant.provider, grant.state.value)] += 1
            if grant.state is GrantState.ACTIVE:
                ttl = grant.access_ttl(now)
                min_ttl[grant.provider] = min(ttl, min_ttl.get(grant.provider, ttl))
        return GrantGauges(by_state=dict(by_state), min_ttl=min_ttl)

    async def store_login(self, result: LoginResult, now: datetime) -> GrantSummary:
        """Store a completed login; a grant held by another `sub` is replaced only with force."""
        self.check_address(result.provider, result.user)
        existing = await self._repository.get(result.provider, result.user)
        if existing is None:
            fresh = Grant(
                id="",
                provider=result.provider,
                user=result.user,
                state=GrantState.ACTIVE,
                generation=0,
                tokens=result.tokens,
                sub=result.sub,
                scopes=result.scopes,
                token_type=result.token_type,
                access_expires_at=result.access_expires_at,
                claims=result.claims,
            )
            grant = await self._repository.insert(fresh, now)
        else:
            if existing.sub is not None and existing.sub != result.sub and not result.force:
                raise BadRequest(
                    f"grant {existing.name} belongs to another account at the provider "
                    "(a different sub); log in with force to replace it"
                )
            updated = replace(
                existing,
                state=GrantState.ACTIVE,
                tokens=result.tokens,
                sub=result.sub,
                scopes=result.scopes,
                token_type=result.token_type,
                claims=result.claims,
                access_expires_at=result.access_expires_at,
                next_refresh_at=None,
                last_error=None,
            )
            grant = await self._repository.replace_tokens(updated, existing.generation, now)
        self._cache.put(grant)
        return GrantSummary.of(grant)

    async def revoke(self, provider: str, user: str) -> bool:
        """Revoke at the IdP when it can, then delete; True when the IdP confirmed.

        When the IdP cannot be reached the grant is kept (TokenUnavailable), so the operator
        can try again instead of leaving a live refresh token behind.
        """
        grant = await self._repository.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        client = self._clients.get(provider)
        tokens = grant.tokens
        token, hint = (
            (tokens.refresh_token, "refresh_token")
            if tokens.refresh_token is not None
            else (tokens.access_token, "access_token")
        )
        revoked = False
        if client is not None and token is not None:
            try:
                revoked = await client.revoke(token, hint)
            except IdpError as exc:
                raise TokenUnavailable(
                    f"could not revoke {grant.name} at the provider ({exc}); "
                    "the grant is kept: try again",
                    RETRY_AFTER_SECONDS,
                ) from None
        await self._repository.delete(grant.id)
        self._cache.drop(provider, user)
        return revoked

    def check_address(self, provider: str, user: str) -> ProviderConfig:
        """The provider's config, or BadRequest for an unknown provider or a bad user label."""
        if not PROVIDER_RE.fullmatch(provider) or provider not in self._providers:
            known = ", ".join(sorted(self._providers)) or "none"
            raise BadRequest(f"unknown provider {provider!r}; configured providers: {known}")
        if not USER_RE.fullmatch(user):
            raise BadRequest("user must match [A-Za-z0-9._@-]{1,128}")
        return self._providers[provider]
