"""The rotation protocol: how the refresh token of one claimed grant is spent, and what follows.

Read this against ROTATION.md; each step names the invariant it keeps. The caller (the
refresher) has claimed the grant's lease, so this is the only refresh of the grant in flight
anywhere (1); every write here is guarded by `lease_owner = me AND generation = g`, and one that
finds the guard broken raises ConflictError: the caller has been fenced off.

1. Intent before send (4). `mark_sent` commits `intent_at` before the refresh token leaves.
   A process that dies after this point leaves the intent behind; whoever claims the grant
   next sees it and treats the refresh as one whose outcome is unknown (a recovery).
2. The call's outcome is classified by `broker.idp` (never sent / rejected / ambiguous) and
   turned into a decision by `broker.schedule.decide`:
   - success: one compare-and-swap (`commit_refresh`) writes the new refresh token, access
     token, expiry and generation + 1, and clears intent and lease; the caller publishes the
     returned grant to the cache only after this commit (2, persist before publish);
   - terminal (invalid_grant, invalid_client, unauthorized_client): reauth_required with the
     reason; the old access token is still served until it really expires (5);
   - transient (the request never reached the IdP, 429, a non-terminal OAuth error): nothing
     is deleted; the next attempt is scheduled with exponential, jittered back-off that
     honours Retry-After (5);
   - ambiguous (read timeout, reset after send, 5xx, an unusable 200): the same refresh token
     is presented again only while `now < first send + refresh_grace` (3), checked with
     `REPLAY_MARGIN` to spare for the clocks of two machines before every send and after
     every pause; the lease is renewed before each pause. Outside the grace, or when there is
     none, the grant becomes reauth_required with reason rotation_lost and
     rotation_recoveries_total{outcome="lost"} counts it (4, 7); a replay that succeeds is
     counted as outcome="recovered". Replays are bounded by the grace window: nothing ever
     loops on a spent token.
3. Refresh ahead of need (6): after a success the next refresh is scheduled at
   `lifetime_fraction` of the new token's life, no later than `min_margin` before expiry,
   with jitter. A success without a usable access token still stores the new refresh token,
   and backs off instead of rotating again at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from broker.config import ProviderConfig
from broker.errors import ConflictError, IdpAmbiguous, IdpError, IdpRejected
from broker.idp.tokens import ASSUMED_LIFETIME, TokenResponse, access_token_in_claim
from broker.metrics import Metrics
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.schedule import (
    ROTATION_LOST,
    Decision,
    Outcome,
    RefreshPolicy,
    backoff,
    decide,
    due_at,
    replay_delay,
)
from broker.store.repository import GrantRepository

REPLAY_MARGIN = timedelta(seconds=1)
# The refresher's logger, as before this module was split from it: every event of one refresh
# keeps coming from one logger.
log = structlog.get_logger("broker.refresher")


class TokenClient(Protocol):
    """What the refresher needs from a provider (ProviderClient; a model IdP in tests)."""

    async def refresh(self, refresh_token: Secret) -> TokenResponse:
        """Spend a refresh token; IdpRejected, IdpAmbiguous or IdpError when it fails."""
        ...

    async def check_id_token(
        self,
        id_token: Secret,
        *,
        nonce: str | None,
        now: datetime,
        access_token: Secret | None = None,
    ) -> dict[str, Any]:
        """The validated claims of an ID token."""
        ...


class Rotation:
    """Spends the refresh token of a grant whose lease the caller holds, and stores the outcome."""

    def __init__(
        self,
        repository: GrantRepository,
        *,
        clients: Mapping[str, TokenClient],
        providers: Mapping[str, ProviderConfig],
        policy: RefreshPolicy,
        metrics: Metrics,
        clock: Callable[[], datetime],
        rand: Callable[[], float],
        owner: str,
        lease: timedelta,
        pause: Callable[[int], timedelta] = replay_delay,
    ) -> None:
        self._repository = repository
        self._clients = clients
        self._providers = providers
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self._owner = owner
        self._lease = lease
        self._pause = pause
        # Grants whose refresh token has been (or is being) sent: their cached access token
        # may already be dead at the IdP (django-oauth-toolkit deletes it on rotation).
        # Added here before the send; the caller discards a grant once it has published the
        # outcome (or given up), so the set also covers the moment between commit and cache.
        self.rotating: set[str] = set()

    async def rotate(self, grant: Grant) -> Grant:
        """Spend `grant`'s refresh token (or replay it, recovering) and store what follows."""
        refresh_token = grant.tokens.refresh_token
        if refresh_token is None:
            # Nothing to spend: served until expiry, then the grant needs a login.
            return await self._settle(grant, grant.state, None, None, 0)
        client = self._clients[grant.provider]
        grace = self._providers[grant.provider].refresh_grace
        recovering = grant.intent_at is not None
        self.rotating.add(grant.id)
        # The provider's grace runs from when it first sees the token, so it is counted from
        # the first send: here, the instant the request leaves; after a crash, the stored
        # intent, which was written before that send. Either is no later than the IdP's view.
        first_sent: datetime | None = grant.intent_at
        if grant.intent_at is None:
            await self._repository.mark_sent(grant.id, grant.generation, self._owner, self._clock())
        else:
            log.warning("refresh_outcome_unknown", grant=grant.name, generation=grant.generation)
        attempt, reason = 0, "a refresh was cut short and its outcome is unknown"
        while True:
            # Checked before every send, after every pause: a replay must reach the IdP while
            # its grace lasts, with a margin for the clocks of two machines.
            if (
                recovering
                and first_sent is not None
                and decide(
                    Outcome.AMBIGUOUS,
                    now=self._clock() + REPLAY_MARGIN,
                    first_sent_at=first_sent,
                    grace=grace,
                )
                is Decision.LOST
            ):
                return await self._lost(grant, f"{reason}; the provider's refresh_grace has passed")
            attempt += 1
            sent_at, started = self._clock(), time.perf_counter()
            first_sent = first_sent or sent_at
            outcome, error, response = await self._call(client, grant)
            self._count(grant, outcome, time.perf_counter() - started, attempt)
            if outcome is Outcome.AMBIGUOUS or (recovering and outcome is Outcome.TRANSIENT):
                # Unknown again (or a replay did not get through): replay while grace lasts.
                recovering, reason = True, str(error)
                await self._extend(grant)
                await asyncio.sleep(self._pause(attempt).total_seconds())
                continue
            return await self._conclude(
                grant,
                outcome=outcome,
                error=error,
                response=response,
                replayed=recovering,
                # The IdP issued the pair no earlier than it first saw the token; dating it
                # from then never believes a token lives longer than it does.
                issued_at=first_sent if recovering else sent_at,
                now=self._clock(),
            )

    async def _conclude(
        self,
        grant: Grant,
        *,
        outcome: Outcome,
        error: Exception | None,
        response: TokenResponse | None,
        replayed: bool,
        issued_at: datetime,
        now: datetime,
    ) -> Grant:
        """Store a known outcome: new tokens, re-authentication, or a back-off."""
        if outcome is Outcome.SUCCESS:
            assert response is not None
            if replayed:
                self._metrics.rotation_recoveries.labels(grant.provider, "recovered").inc()
            return await self._commit(grant, response, now, issued_at=issued_at)
        if outcome is Outcome.TERMINAL:
            if replayed:  # the replay was refused: the rotation happened and is lost
                return await self._lost(grant, str(error))
            return await self._settle(
                grant, GrantState.REAUTH_REQUIRED, str(error), None, grant.refresh_failures
            )
        failures = grant.refresh_failures + 1
        retry_after = error.retry_after if isinstance(error, IdpError) else None
        delay = backoff(failures, self._policy, self._rand(), retry_after)
        return await self._settle(grant, GrantState.ACTIVE, str(error), now + delay, failures)

    async def _call(
        self, client: TokenClient, grant: Grant
    ) -> tuple[Outcome, Exception | None, TokenResponse | None]:
        assert grant.tokens.refresh_token is not None
        try:
            response = await client.refresh(grant.tokens.refresh_token)
        except IdpRejected as exc:
            return (Outcome.TERMINAL if exc.terminal else Outcome.TRANSIENT), exc, None
        except IdpAmbiguous as exc:
            return Outcome.AMBIGUOUS, exc, None
        except IdpError as exc:
            return Outcome.TRANSIENT, exc, None
        return Outcome.SUCCESS, None, response

    def _count(self, grant: Grant, outcome: Outcome, seconds: float, attempt: int) -> None:
        self._metrics.refresh.labels(grant.provider, outcome.value).inc()
        self._metrics.refresh_duration.labels(grant.provider).observe(seconds)
        log.info(
            "refresh",
            grant=grant.name,
            generation=grant.generation,
            outcome=outcome.value,
            attempt=attempt,
            duration_ms=round(seconds * 1000, 1),
        )

    async def _commit(
        self, grant: Grant, response: TokenResponse, now: datetime, issued_at: datetime
    ) -> Grant:
        """Store a successful refresh (the only place a new refresh token is written)."""
        config = self._providers[grant.provider]
        refresh_token = response.refresh_token
        if refresh_token is None and not config.rotates_refresh_tokens:
            refresh_token = grant.tokens.refresh_token
        elif refresh_token is None:
            log.warning(
                "no_new_refresh_token",
                grant=grant.name,
                detail="the provider rotates but sent no refresh token; the grant will need a "
                "login when this access token expires",
            )
        problem: str | None = None
        try:
            access_token, token_type, expires_in = await self._access_token(grant, response, now)
        except IdpError as exc:
            # The new refresh token is in hand and must be kept whatever else is wrong.
            problem = f"the refresh response carries no usable access token: {exc}"
            log.warning("refresh_without_access_token", grant=grant.name, reason=str(exc))
        failures = 0
        if problem is None:
            tokens = TokenSet(
                refresh_token, access_token, response.id_token or grant.tokens.id_token
            )
            issued: datetime | None = issued_at
            expires_at = issued_at + timedelta(seconds=expires_in or ASSUMED_LIFETIME)
            next_refresh = due_at(issued_at, expires_at, self._policy, self._rand())
        else:
            tokens = TokenSet(refresh_token, grant.tokens.access_token, grant.tokens.id_token)
            issued, expires_at = grant.access_issued_at, grant.access_expires_at or now
            token_type = grant.token_type
            # Not at the old token's due time, which has passed: that would rotate again at
            # once, and again, for as long as the provider answers this way.
            failures = grant.refresh_failures + 1
            next_refresh = now + backoff(failures, self._policy, self._rand())
        new = replace(
            grant,
            tokens=tokens,
            token_type=token_type,
            scopes=response.scope or grant.scopes,
            access_issued_at=issued,
            access_expires_at=expires_at,
            next_refresh_at=None if refresh_token is None else next_refresh,
            last_error=problem,
            refresh_failures=failures,
        )
        return await self._repository.commit_refresh(new, grant.generation, self._owner, now)

    async def _access_token(
        self, grant: Grant, response: TokenResponse, now: datetime
    ) -> tuple[Secret, str, int | None]:
        """The new access token: from the response, or from a claim of its validated ID token."""
        claim = self._providers[grant.provider].access_token_from.claim
        if claim is None:
            if response.access_token is None:
                raise IdpError("the refresh response has no access_token")
            return response.access_token, response.token_type, response.expires_in
        if response.id_token is None:
            raise IdpError(f"the refresh response has no ID token carrying {claim}")
        claims = await self._clients[grant.provider].check_id_token(
            response.id_token, nonce=None, now=now
        )
        return access_token_in_claim(claims, claim)

    async def _lost(self, grant: Grant, reason: str) -> Grant:
        self._metrics.rotation_recoveries.labels(grant.provider, "lost").inc()
        log.error("rotation_lost", grant=grant.name, generation=grant.generation, reason=reason)
        return await self._settle(
            grant,
            GrantState.REAUTH_REQUIRED,
            f"{ROTATION_LOST}: {reason}",
            None,
            grant.refresh_failures,
        )

    async def _settle(
        self,
        grant: Grant,
        state: GrantState,
        error: str | None,
        next_refresh_at: datetime | None,
        failures: int,
    ) -> Grant:
        return await self._repository.settle(
            grant,
            self._owner,
            self._clock(),
            state=state,
            last_error=error,
            next_refresh_at=next_refresh_at,
            refresh_failures=failures,
        )

    async def _extend(self, grant: Grant) -> None:
        now = self._clock()
        if await self._repository.claim(grant.id, self._owner, now, now + self._lease) is None:
            raise ConflictError(f"lost the lease on {grant.name} while replaying")
