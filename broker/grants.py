"""The grant service: what the API asks for, answered from the cache and kept in the store.

The token path (`token`) touches memory only. Writes go to the store first and reach the cache
only after their commit (persist before publish).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

from broker.cache import GrantCache, Subscriber
from broker.config import ProviderConfig
from broker.errors import (
    BadRequest,
    ConflictError,
    GrantNotFound,
    IdpError,
    IdpRejected,
    ReauthRequired,
    StoreError,
    TokenUnavailable,
)
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
from broker.tally import GrantTally

# How long a caller should wait before asking again for a grant whose token has expired.
RETRY_AFTER_SECONDS = 30
# How long a caller waits for a refresh it needs; an admin's refresh may take the whole call.
CALLER_WAIT_SECONDS = 10.0
ADMIN_WAIT_SECONDS = MAX_CALL_SECONDS + 5
# A token issued this recently (at most this share of its life ago) is not refreshed again for
# a caller's min_ttl: a caller asking more life than the provider gives must not cost a
# rotation per call.
MIN_REFRESH_INTERVAL = timedelta(seconds=5)
MIN_REFRESH_SHARE = 0.25
# From this long before a grant's refresh time, the token path confirms with the store that no
# other process sharing it is rotating the grant; a store slower than this is not waited for.
NEAR_REFRESH = timedelta(seconds=2)
STORE_CHECK_SECONDS = 0.25
RETRY_AFTER_STORE_SECONDS = 5
log = structlog.get_logger("broker.grants")


class Revoker(Protocol):
    """What revoking a grant needs from its provider (ProviderClient; a model IdP in tests)."""

    async def revoke_grant(self, refresh_token: Secret | None, access_token: Secret | None) -> bool:
        """Revoke the grant's tokens at the provider; False when it has nowhere to do so."""
        ...


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


def check_user(user: str) -> str:
    """`user` when it is a well-formed USER label (CONTRACT.md); else BadRequest."""
    if not USER_RE.fullmatch(user):
        raise BadRequest("user must match [A-Za-z0-9._@-]{1,128}")
    return user


class GrantService:
    """Grants as callers and admins see them."""

    def __init__(
        self,
        repository: GrantRepository,
        providers: Mapping[str, ProviderConfig],
        clients: Mapping[str, Revoker] | None = None,
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
        self._tally = GrantTally(self._cache.by_id)
        for grant in self._cache:
            self._tally.update(None, grant)
        self._cache.subscribe(self._tally.update)
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

    def ready(self, provider: str, user: str, now: datetime | None = None) -> Grant | None:
        """The grant whose access token `token` would serve at once with no `min_ttl`, without
        waiting on anything or asking the store; None when `token` has more to do (or to say).

        The token path's steady state: an active grant, cached, not being refreshed here or
        elsewhere as far as this process knows, not near its refresh time (where `token` asks
        the store), with a live access token. `now`: the clock's reading, when the caller has
        one already.
        """
        grant = self._cache.get(provider, user)
        if grant is None or grant.state is not GrantState.ACTIVE or grant.intent_at is not None:
            return None
        refresher = self._refresher
        if now is None:
            now = self._clock()
        if refresher is not None:
            if (
                refresher.commit_pending(grant.id)
                or refresher.is_rotating(grant.id)
                or refresher.behind(grant)
            ):
                return None
            if grant.next_refresh_at is not None and now >= grant.next_refresh_at - NEAR_REFRESH:
                return None
        if grant.tokens.access_token is None or needs_refresh(grant.access_expires_at, now, 0):
            return None
        return grant

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
            return self._after_refusal(grant, now, min_ttl)
        refresher = self._refresher
        if refresher is not None:
            self._refuse_while_storing(grant)
            if await self._rotating(grant, now):
                # The cached token may die any moment now (the provider deletes it when it
                # rotates): wait for the refresh in flight, one IdP round trip at most.
                grant = await self._rotation_ended(grant)
                now = self._clock()
                if grant.state is not GrantState.ACTIVE:
                    return self._after_refusal(grant, now, min_ttl)
                self._refuse_while_storing(grant)
                if (
                    refresher.is_rotating(grant.id)
                    or grant.intent_at is not None
                    or refresher.behind(grant)
                ):
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
                return self._after_refusal(grant, now, min_ttl)
            self._refuse_while_storing(grant)
        if grant.tokens.refresh_token is None:
            raise _unrefreshable(grant, now)
        if grant.access_ttl(now) > 0 and grant.intent_at is None:
            return grant
        retry_after = RETRY_AFTER_SECONDS
        if grant.next_refresh_at is not None and grant.next_refresh_at > now:
            retry_after = max(1, math.ceil((grant.next_refresh_at - now).total_seconds()))
        gate_wait = None if refresher is None else refresher.retry_after(grant.provider)
        if gate_wait is not None:
            retry_after = max(1, math.ceil(gate_wait))
        raise TokenUnavailable(
            f"grant {grant.name} has no valid access token right now"
            + (f" ({grant.last_error})" if grant.last_error else ""),
            retry_after,
        )

    async def _rotation_ended(self, grant: Grant) -> Grant:
        """The grant once no refresh of it is in flight (here or elsewhere), or as it stands
        after CALLER_WAIT_SECONDS."""
        assert self._refresher is not None
        deadline = time.monotonic() + CALLER_WAIT_SECONDS
        while True:
            current = self._cached(grant.provider, grant.user)
            busy = (
                self._refresher.is_rotating(current.id)
                or current.intent_at is not None
                or self._refresher.behind(current)
            )
            left = deadline - time.monotonic()
            if not busy or left <= 0 or current.state is not GrantState.ACTIVE:
                return current
            await self._refresher.wait_for_change(current, left)

    def _refuse_while_storing(self, grant: Grant) -> None:
        """New tokens the store has not taken yet are not served, and the old access token is
        gone at the provider: the caller should come back in a moment (ROTATION.md, 7)."""
        assert self._refresher is not None
        if self._refresher.commit_pending(grant.id):
            raise TokenUnavailable(
                f"grant {grant.name} was just refreshed and its new tokens are being stored; "
                "the store is not accepting writes right now",
                1,
            )

    async def _rotating(self, grant: Grant, now: datetime) -> bool:
        """Whether the grant's refresh token is at the IdP now, here or in another process.

        Memory answers for this process, and for others whose claim this process has seen or
        been told of by the store's feed. Around the grant's refresh time the store is also
        asked (one primary-key read, briefly): a newer generation or another owner's open
        intent both mean the cached token is about to die, or has. A store that cannot answer
        in time changes nothing: the cached token is served (ROTATION.md invariant 7).
        """
        assert self._refresher is not None
        if (
            self._refresher.is_rotating(grant.id)
            or grant.intent_at is not None
            or self._refresher.behind(grant)
        ):
            return True
        near = grant.next_refresh_at is not None and now >= grant.next_refresh_at - NEAR_REFRESH
        if not near:
            return False
        try:
            return await asyncio.wait_for(
                self._repository.changed_elsewhere(grant.id, grant.generation, now),
                STORE_CHECK_SECONDS,
            )
        except (StoreError, TimeoutError):
            return False

    async def _load_missing(self, provider: str, user: str) -> Grant:
        """A grant another process stored since this one last looked, or GrantNotFound."""
        try:
            grant = await self._repository.get(provider, user)
        except StoreError:
            raise TokenUnavailable(
                f"grant {grant_name(provider, user)} is not known here and the store cannot be "
                "read right now",
                RETRY_AFTER_STORE_SECONDS,
            ) from None
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        self._cache.put(grant)
        return grant

    def _cached(self, provider: str, user: str) -> Grant:
        grant = self._cache.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        return grant

    def _after_refusal(self, grant: Grant, now: datetime, min_ttl: float) -> Grant:
        """A grant that needs a login still serves its access token until it really expires,
        to callers asking for no more life than it has left (no refresh can give more).

        Not after rotation_lost: the provider has most likely rotated, and so deleted it.
        """
        lost = (grant.last_error or "").startswith(ROTATION_LOST)
        if (
            grant.state is GrantState.REAUTH_REQUIRED
            and not lost
            and grant.access_ttl(now) > max(min_ttl, 0)
        ):
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
            and grant.access_expires_at is not None
            and (
                now - grant.access_issued_at
                < min(
                    MIN_REFRESH_INTERVAL,
                    (grant.access_expires_at - grant.access_issued_at) * MIN_REFRESH_SHARE,
                )
            )
        )
        gate_closed = self._refresher.retry_after(grant.provider) is not None
        return not in_backoff and not just_issued and not gate_closed

    async def refresh_now(self, provider: str, user: str) -> GrantSummary:
        """Refresh a grant at once (admin); the grant as it stands afterwards."""
        grant = self._cache.get(provider, user)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        if grant.state is not GrantState.ACTIVE:
            raise ReauthRequired(f"grant {grant.name} needs a new login: {grant.last_error}")
        if grant.tokens.refresh_token is None:
            raise ReauthRequired(
                f"grant {grant.name} has no refresh token: a new access token needs a login "
                "(the one it holds is served until it expires)"
            )
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
        return await self._repository.summaries(self._clock())

    async def summary(self, provider: str, user: str) -> GrantSummary:
        """One grant without secrets."""
        found = await self._repository.summaries(self._clock(), provider, user)
        if not found:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        return found[0]

    async def import_grant(self, request: Import, now: datetime) -> tuple[GrantSummary, bool]:
        """Store an imported grant; returns its summary and whether it is new."""
        existing = await self._repository.get(request.provider, request.user)
        grant = self._imported(request, existing, now)
        if existing is None:
            stored = await self._repository.insert(grant, now)
        else:
            stored = await self._repository.replace_tokens(grant, existing.generation, now)
        self._stored(stored)
        return GrantSummary.of(stored), existing is None

    async def import_many(self, requests: list[Import], now: datetime) -> list[str]:
        """Store many imports in one transaction; per import "created", "replaced", or the
        reason it was refused (a bad address, an existing grant without force, a second line
        for the same grant). Nothing refused is written; what is accepted is written together.
        A grant written by someone else meanwhile makes the batch start over, once.
        """
        try:
            return await self._import_many(requests, now)
        except ConflictError:
            return await self._import_many(requests, now)

    async def _import_many(self, requests: list[Import], now: datetime) -> list[str]:
        outcomes: list[str] = [""] * len(requests)
        existing = await self._repository.get_many([(r.provider, r.user) for r in requests])
        seen: set[tuple[str, str]] = set()
        new: list[tuple[int, Grant]] = []
        replacing: list[tuple[int, Grant, int]] = []
        for index, request in enumerate(requests):
            key = (request.provider, request.user)
            try:
                if key in seen:
                    raise BadRequest(f"grant {grant_name(*key)} appears more than once")
                seen.add(key)
                current = existing.get(key)
                grant = self._imported(request, current, now)
            except BadRequest as exc:
                outcomes[index] = str(exc)
                continue
            if current is None:
                new.append((index, grant))
            else:
                replacing.append((index, grant, current.generation))
        stored = await self._repository.store_many(
            [grant for _, grant in new], [(grant, gen) for _, grant, gen in replacing], now
        )
        for (index, _grant), grant in zip(new, stored[: len(new)], strict=True):
            outcomes[index] = "created"
            self._cache.put(grant)
        for (index, _grant, _gen), grant in zip(replacing, stored[len(new) :], strict=True):
            outcomes[index] = "replaced"
            self._cache.put(grant)
        if stored and self._refresher is not None:
            self._refresher.poke()
        return outcomes

    def _imported(self, request: Import, existing: Grant | None, now: datetime) -> Grant:
        """The grant an import stores (not yet written); BadRequest when it may not be."""
        provider = self.check_address(request.provider, request.user)
        if request.access_token is not None and request.expires_in is None:
            raise BadRequest("expires_in is required with access_token")
        # A grant that needs a login holds nothing worth keeping: an import is its rescue.
        if (
            existing is not None
            and existing.effective_state(now) is GrantState.ACTIVE
            and not request.force
        ):
            raise BadRequest(
                f"grant {existing.name} already exists; import with force to replace its tokens"
            )
        expires_at = (
            None
            if request.expires_in is None or request.access_token is None
            else now + timedelta(seconds=request.expires_in)
        )
        tokens = TokenSet(refresh_token=request.refresh_token, access_token=request.access_token)
        return self._grant(
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
            # Issued elsewhere, at a time not known: a caller's min_ttl may refresh it at once.
            issued_at=None,
        )

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
        grant = self._grant(
            existing,
            provider,
            user,
            tokens=tokens,
            scopes=scopes,
            sub=sub,
            claims=claims,
            token_type=token_type,
            expires_at=expires_at,
            now=now,
            issued_at=now,  # from the provider, just now
        )
        if existing is None:
            stored = await self._repository.insert(grant, now)
        else:
            stored = await self._repository.replace_tokens(grant, existing.generation, now)
        self._stored(stored)
        return stored

    def _grant(
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
        issued_at: datetime | None,
    ) -> Grant:
        """A new grant, or new tokens over an existing one, as it is to be written; the access
        token issued at `issued_at` (None: not known)."""
        return Grant(
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
            access_issued_at=None if expires_at is None else issued_at,
            next_refresh_at=self._first_refresh(tokens, expires_at, now),
            claims=claims,
            created_at=None if existing is None else existing.created_at,
        )

    def gauges(self, now: datetime) -> GrantGauges:
        """Counts by provider and state, and the least access-token life per provider."""
        return self._tally.gauges(now)

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
        tokens = result.tokens
        kept = None if tokens.refresh_token is not None else _kept_refresh_token(existing, result)
        if kept is not None:
            tokens = replace(tokens, refresh_token=kept)
            log.info(
                "login_kept_refresh_token",
                grant=grant_name(result.provider, result.user),
                detail="the provider answered this login without a refresh token; the grant "
                "keeps the one it held for the same account",
            )
        elif tokens.refresh_token is None:
            # A warning when a refresh token the grant held is dropped; for a provider that
            # never issues one (netID) this is how every login goes.
            dropped = existing is not None and existing.tokens.refresh_token is not None
            (log.warning if dropped else log.info)(
                "login_without_refresh_token",
                grant=grant_name(result.provider, result.user),
                detail="the provider answered this login without a refresh token: the grant "
                "is served until its access token expires, then needs a new login"
                + ("; the refresh token it held is dropped" if dropped else ""),
            )
        grant = await self._save(
            existing,
            result.provider,
            result.user,
            tokens=tokens,
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

        No refresh of the grant may be in flight meanwhile, here or elsewhere (one that is
        finishes first), so the refresh token revoked is the live one. When the IdP cannot be
        reached the grant is kept (TokenUnavailable), so the operator can try again instead of
        leaving a live refresh token behind.
        """
        try:
            grant = await self._repository.get(provider, user)
        except StoreError:
            raise TokenUnavailable(
                "the store cannot be read right now; try again", RETRY_AFTER_STORE_SECONDS
            ) from None
        if grant is None:
            raise GrantNotFound(f"no grant {grant_name(provider, user)}")
        if self._refresher is None:
            return await self._revoke_and_delete(grant)
        try:
            async with self._refresher.exclusive(grant, ADMIN_WAIT_SECONDS) as current:
                if current is None:
                    raise GrantNotFound(f"no grant {grant_name(provider, user)}")
                return await self._revoke_and_delete(current)
        except ConflictError:
            raise TokenUnavailable(
                f"a refresh of grant {grant.name} is in flight; try again", 5
            ) from None

    async def _revoke_and_delete(self, grant: Grant) -> bool:
        client = self._clients.get(grant.provider)
        tokens = grant.tokens
        revoked = False
        if grant.intent_at is not None:
            log.warning(
                "revoking_with_unknown_outcome",
                grant=grant.name,
                detail="a refresh of this grant ended without a known outcome; the provider may "
                "hold a newer refresh token than the one revoked",
            )
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
        self._cache.drop(grant.provider, grant.user)
        return revoked

    def check_address(self, provider: str, user: str) -> ProviderConfig:
        """The provider's config, or BadRequest for an unknown provider or a bad user label."""
        if not PROVIDER_RE.fullmatch(provider) or provider not in self._providers:
            known = ", ".join(sorted(self._providers)) or "none"
            raise BadRequest(f"unknown provider {provider!r}; configured providers: {known}")
        check_user(user)
        return self._providers[provider]


def _kept_refresh_token(existing: Grant | None, result: LoginResult) -> Secret | None:
    """The refresh token a login answered without one keeps: the grant's own, when it is the
    same account (a known, equal sub), can still refresh, and has no refresh that ended
    without a known outcome. Providers that issue a refresh token only at the first consent
    answer later logins so."""
    if (
        existing is None
        or existing.state is not GrantState.ACTIVE
        or existing.intent_at is not None
        or result.sub is None
        or existing.sub != result.sub
    ):
        return None
    return existing.tokens.refresh_token


def _unrefreshable(grant: Grant, now: datetime) -> ReauthRequired:
    """Why a grant with no refresh token cannot serve a caller: its token expired, or lives
    less than the caller's min_ttl, which no refresh can give (as for a grant that needs a
    login, `GrantService._after_refusal`)."""
    ttl = grant.access_ttl(now)
    if ttl > 0:
        return ReauthRequired(
            f"grant {grant.name} has no refresh token and its access token lives {ttl:.0f} s, "
            "less than min_ttl asks; log in again"
        )
    return ReauthRequired(
        f"grant {grant.name} has no refresh token and its access token expired; log in again"
    )
