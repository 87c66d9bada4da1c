"""The grant service: what the API asks for, answered from the cache and kept in the store.

The token path (`token`) touches memory only. Writes go to the store first and reach the cache
only after their commit (persist before publish).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from broker.cache import GrantCache
from broker.config import ProviderConfig
from broker.errors import BadRequest, GrantNotFound, ReauthRequired, TokenUnavailable
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


class GrantService:
    """Grants as callers and admins see them."""

    def __init__(
        self, repository: GrantRepository, providers: Mapping[str, ProviderConfig]
    ) -> None:
        self._repository = repository
        self._providers = providers
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
        provider = self._check_address(request.provider, request.user)
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

    def _check_address(self, provider: str, user: str) -> ProviderConfig:
        if not PROVIDER_RE.fullmatch(provider) or provider not in self._providers:
            known = ", ".join(sorted(self._providers)) or "none"
            raise BadRequest(f"unknown provider {provider!r}; configured providers: {known}")
        if not USER_RE.fullmatch(user):
            raise BadRequest("user must match [A-Za-z0-9._@-]{1,128}")
        return self._providers[provider]
