"""The grant service: what the API asks for, answered from the cache and kept in the store.

The token path (`token`) touches memory only. Writes go to the store first and reach the cache
only after their commit (persist before publish).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from broker.cache import GrantCache, Subscriber
from broker.config import ProviderConfig
from broker.errors import (
    BadRequest,
    GrantNotFound,
    IdpError,
    IdpRejected,
    ReauthRequired,
    TokenUnavailable,
)
from broker.idp.client import ProviderClient
from broker.idp.http import MAX_CALL_SECONDS
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
from broker.refresher import Refresher
from broker.schedule import ROTATION_LOST, RefreshPolicy, due_at, needs_refresh
from broker.store.repository import GrantRepository

# How long a caller should wait before asking again for a grant whose token has expired.
RETRY_AFTER_SECONDS = 30
# How long a caller waits for a refresh it needs; an admin's refresh may take the whole call.
CALLER_WAIT_SECONDS = 10.0
ADMIN_WAIT_SECONDS = MAX_CALL_SECONDS + 5
# A token issued this recently is not refreshed again for a caller's min_ttl.
MIN_REFRESH_INTERVAL = timedelta(seconds=5)
# From this long before a grant's refresh time, the token path confirms with the store that no
# other process sharing it is rotating the grant.
NEAR_REFRESH = timedelta(seconds=2)
log = structlog.get_logger("broker.grants")


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
        *,
        cache: GrantCache | None = None,
        refresher: Refresher | None = None,
        policy: RefreshPolicy | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._repository = repository
        self._providers = providers
        self._clients = clients if clients is not None else {}
        self._cache = cache if cache is not None else GrantCache()
        self._refresher = refresher
        self._policy = policy or RefreshPolicy()
        self._clock = clock
        self._rand = rand

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Hear of every change to a cached grant (`GrantCache.subscribe`); the unsubscriber."""
        return self._cache.subscribe(subscriber)

    async def load(self) -> int:
        """Fill the cache from the store; how many grants it holds."""
        if self._refresher is not None:
            await self._refresher.sync()  # from version 0: everything, and the deletions since
            return len(self._cache)
        for grant in await self._repository.all():
            self._cache.put(grant)
        return len(self._cache)

    async def token(self, provider: str, user: str, min_ttl: float = 0) -> Grant:
        """The grant whose access token may be served now, or the reason it may not.

        The steady state answers from memory. A token that has expired, or lives less than
        `min_ttl`, waits for one refresh (shared with every other caller of this grant); when
        that cannot help, a still-valid token is served anyway, and an expired one is refused
        with a Retry-After.
        """
        grant = self._cache.get(provider, user) or await self._load_missing(provider, user)
        now = self._clock()
        if grant.state is not GrantState.ACTIVE:
            return self._after_refusal(grant, now)
        refresher = self._refresher
        if refresher is not None and await self._rotating(grant, now):
            # The cached token may die any moment now (the provider deletes it when it
            # rotates): join the refresh in flight, one IdP round trip at most.
            await refresher.wait(grant, CALLER_WAIT_SECONDS)
            grant, now = self._cached(provider, user), self._clock()
            if grant.state is not GrantState.ACTIVE:
                return self._after_refusal(grant, now)
            if refresher.is_rotating(grant.id) or grant.intent_at is not None:
                raise TokenUnavailable(
                    f"a refresh of grant {grant.name} is taking long; its old access token "
                    "may no longer be valid",
                    1,
                )
        if grant.tokens.access_token is not None and not needs_refresh(
            grant.access_expires_at, now, min_ttl
        ):
            return grant
        if refresher is not None and self._may_refresh_for_caller(grant, now):
            await refresher.wait(grant, CALLER_WAIT_SECONDS)
            grant, now = self._cached(provider, user), self._clock()
            if grant.state is not GrantState.ACTIVE:
                return self._after_refusal(grant, now)
        if grant.access_ttl(now) > 0:
            return grant
        if grant.tokens.refresh_token is None:
            raise ReauthRequired(
                f"grant {grant.name} has no refresh token and its access token expired; "
                "log in again"
            )
        retry_after = RETRY_AFTER_SECONDS
        if grant.next_refresh_at is not None and grant.next_refresh_at > now:
            retry_after = max(1, math.ceil((grant.next_refresh_at - now).total_seconds()))
        raise TokenUnavailable(
            f"grant {grant.name} has no valid access token right now"
            + (f" ({grant.last_error})" if grant.last_error else ""),
            retry_after,
        )

    async def _rotating(self, grant: Grant, now: datetime) -> bool:
        """Whether the grant's refresh token is at the IdP now, here or in another process.

        Memory answers for this process. Another process sharing the store can only be
        rotating a grant around its refresh time, so only then is the store asked (one
        primary-key read): a newer generation or another owner's open intent both mean the
        cached token is about to die, or has.
        """
        assert self._refresher is not None
        if self._refresher.is_rotating(grant.id) or grant.intent_at is not None:
            return True
        near = grant.next_refresh_at is not None and now >= grant.next_refresh_at - NEAR_REFRESH
        if not near:
            return False
        return await self._repository.changed_elsewhere(grant.id, grant.generation, now)

    async def _load_missing(self, provider: str, user: str) -> Grant:
        """A grant another process stored since this one last looked, or GrantNotFound."""
        grant = await self._repository.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        self._cache.put(grant)
        return grant

    def _cached(self, provider: str, user: str) -> Grant:
        grant = self._cache.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        return grant

    def _after_refusal(self, grant: Grant, now: datetime) -> Grant:
        """A grant that needs a login still serves its access token until it really expires.

        Not after rotation_lost: the provider has most likely rotated, and so deleted it.
        """
        lost = (grant.last_error or "").startswith(ROTATION_LOST)
        if grant.state is GrantState.REAUTH_REQUIRED and not lost and grant.access_ttl(now) > 0:
            return grant
        reason = grant.last_error or grant.state.value
        raise ReauthRequired(f"grant {grant.name} needs a new login: {reason}")

    def _may_refresh_for_caller(self, grant: Grant, now: datetime) -> bool:
        """Whether a caller may wait on a refresh: not in back-off, not just refreshed."""
        if self._refresher is None or grant.tokens.refresh_token is None:
            return False
        in_backoff = grant.refresh_failures > 0 and (
            grant.next_refresh_at is not None and grant.next_refresh_at > now
        )
        # A caller asking for more life than the provider gives must not refresh on every call.
        just_issued = (
            grant.access_ttl(now) > 0
            and grant.access_issued_at is not None
            and (now - grant.access_issued_at < MIN_REFRESH_INTERVAL)
        )
        return not in_backoff and not just_issued

    async def refresh_now(self, provider: str, user: str) -> GrantSummary:
        """Refresh a grant at once (admin); the grant as it stands afterwards."""
        grant = self._cache.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        if grant.state is not GrantState.ACTIVE:
            raise ReauthRequired(f"grant {grant.name} needs a new login: {grant.last_error}")
        if grant.tokens.refresh_token is None:
            raise BadRequest(f"grant {grant.name} has no refresh token to refresh with")
        if self._refresher is None:
            raise TokenUnavailable("the refresher is not running", RETRY_AFTER_SECONDS)
        await self._refresher.wait(grant, ADMIN_WAIT_SECONDS)
        return GrantSummary.of(self._cache.get(provider, user) or grant)

    def _first_refresh(
        self, tokens: TokenSet, expires_at: datetime | None, now: datetime
    ) -> datetime | None:
        """When a newly stored grant is first refreshed: never, now, or on schedule."""
        if tokens.refresh_token is None:
            return None
        if tokens.access_token is None or expires_at is None:
            return now
        return due_at(now, expires_at, self._policy, self._rand())

    def _stored(self, grant: Grant) -> None:
        self._cache.put(grant)
        if self._refresher is not None:
            self._refresher.poke()

    async def summaries(self) -> list[GrantSummary]:
        """Every grant, without secrets, as the store has it."""
        now = self._clock()
        return [GrantSummary.of(grant, now) for grant in await self._repository.all()]

    async def summary(self, provider: str, user: str) -> GrantSummary:
        """One grant without secrets."""
        grant = await self._repository.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        return GrantSummary.of(grant, self._clock())

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
        existing = await self._repository.get(request.provider, request.user)
        if existing is not None and not request.force:
            raise BadRequest(
                f"grant {existing.name} already exists; import with force to replace its tokens"
            )
        grant = await self._save(
            existing,
            request.provider,
            request.user,
            tokens=tokens,
            scopes=request.scope if request.scope is not None else provider.scopes,
            sub=None,
            claims={},
            token_type="Bearer",
            expires_at=expires_at,
            now=now,
        )
        return GrantSummary.of(grant), existing is None

    async def _save(
        self,
        existing: Grant | None,
        provider: str,
        user: str,
        *,
        tokens: TokenSet,
        scopes: tuple[str, ...],
        sub: str | None,
        claims: dict[str, Any],
        token_type: str,
        expires_at: datetime | None,
        now: datetime,
    ) -> Grant:
        """Store a new grant, or new tokens over an existing one (generation + 1); publish it."""
        grant = Grant(
            id="" if existing is None else existing.id,
            provider=provider,
            user=user,
            state=GrantState.ACTIVE,
            generation=0 if existing is None else existing.generation,
            tokens=tokens,
            sub=sub,
            scopes=scopes,
            token_type=token_type,
            access_expires_at=expires_at,
            access_issued_at=None if expires_at is None else now,
            next_refresh_at=self._first_refresh(tokens, expires_at, now),
            claims=claims,
            created_at=None if existing is None else existing.created_at,
        )
        if existing is None:
            stored = await self._repository.insert(grant, now)
        else:
            stored = await self._repository.replace_tokens(grant, existing.generation, now)
        self._stored(stored)
        return stored

    def gauges(self, now: datetime) -> GrantGauges:
        """Counts by provider and state, and the least access-token life per provider."""
        by_state: Counter[tuple[str, str]] = Counter()
        min_ttl: dict[str, float] = {}
        for grant in self._cache:
            state = grant.effective_state(now)
            by_state[(grant.provider, state.value)] += 1
            if state is GrantState.ACTIVE:
                ttl = grant.access_ttl(now)
                min_ttl[grant.provider] = min(ttl, min_ttl.get(grant.provider, ttl))
        return GrantGauges(by_state=dict(by_state), min_ttl=min_ttl)

    def unusable(self, names: Iterable[str], now: datetime) -> list[str]:
        """Why each of these PROVIDER/USER grants could not be served now; empty when all can.

        Usable means active with a live access token: what /readyz demands of the grants the
        config marks required. Only states are named, never a provider's error text, since
        /readyz answers anyone.
        """
        problems: list[str] = []
        for name in names:
            provider, _, user = name.partition("/")
            grant = self._cache.get(provider, user)
            if grant is None:
                problems.append(
                    f"grant {name}: not found; log in with: token-broker login {provider} {user}"
                )
                continue
            state = grant.effective_state(now)
            if state is not GrantState.ACTIVE:
                problems.append(f"grant {name}: {state.value}")
            elif grant.access_ttl(now) <= 0:
                problems.append(
                    f"grant {name}: no live access token (its refresh has not succeeded)"
                )
        return problems

    async def store_login(self, result: LoginResult, now: datetime) -> GrantSummary:
        """Store a completed login; a grant held by another `sub` is replaced only with force."""
        self.check_address(result.provider, result.user)
        existing = await self._repository.get(result.provider, result.user)
        if existing is not None and existing.sub not in (None, result.sub) and not result.force:
            raise BadRequest(
                f"grant {existing.name} belongs to another account at the provider "
                "(a different sub); log in with force to replace it"
            )
        grant = await self._save(
            existing,
            result.provider,
            result.user,
            tokens=result.tokens,
            scopes=result.scopes,
            sub=result.sub,
            claims=result.claims,
            token_type=result.token_type,
            expires_at=result.access_expires_at,
            now=now,
        )
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
        revoked = False
        if client is not None:
            try:
                revoked = await client.revoke_grant(tokens.refresh_token, tokens.access_token)
            except IdpRejected as exc:
                # The provider answered and will not revoke: keeping the grant would not
                # change that, and would leave it impossible to delete.
                log.warning("revocation_refused", grant=grant.name, reason=str(exc))
            except IdpError as exc:
                raise TokenUnavailable(
                    f"could not revoke {grant.name} at the provider ({exc}); "
                    "the grant is kept: try again",
                    RETRY_AFTER_SECONDS,
                ) from None
        await self._repository.delete(grant.id, self._clock())
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
