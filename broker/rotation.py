"""The rotation protocol: spending one claimed grant's refresh token, and storing what follows.

Read this against ROTATION.md. The caller (broker.refresher) has resolved everything that can
fail without spending the token (the provider's metadata and keys: "never sent") and claimed the
grant, which in one write took the lease and recorded the intent to send (invariants 1, 4). It
hands over an `Attempt`: the claimed grant, and the provider's config and client as they were
when the refresh started, so a reload that changes or removes the provider meanwhile cannot pull
them from under a call that is already at the provider.

1. Send (the lease is checked for enough remaining life right before every send, and renewed
   when short: invariant 9). The outcome is classified by `broker.idp` and
   `broker.schedule.failure_class` into never sent / not processed / ambiguous, and turned into a
   decision by `broker.schedule.decide`:
   - success: one compare-and-swap on the generation (`commit_refresh`) writes the new refresh
     token, access token, expiry and generation + 1, and clears intent and lease; the caller
     publishes the grant only after this commit (2, persist before publish);
   - invalid_grant: reauth_required with the reason; the old access token is still served until
     it really expires (5);
   - invalid_client / unauthorized_client: the client's registration, not the user's grant: the
     grant is left as it is and the caller pauses the provider (5);
   - never sent or not processed (429, 503, another 4xx, an OAuth error that is not final):
     nothing is deleted; the next attempt is scheduled with exponential, jittered back-off that
     honours Retry-After, with the same refresh token (5);
   - ambiguous (read timeout, reset after send, 500, 502, 504, an unusable 200): the provider
     may have rotated. The same refresh token is presented again only while
     `now < first send + refresh_grace` (3), checked with REPLAY_MARGIN to spare before every
     send and after every pause. Outside the grace, a provider that lets this client introspect
     (RFC 7662) is asked whether the old refresh token is still active: active means it never
     rotated, so the grant stays active and is retried; inactive, or no introspection, makes the
     grant reauth_required with reason rotation_lost, counted in
     rotation_recoveries_total{outcome="lost"} (4, 7). Replays are bounded by the grace window:
     nothing ever loops on a spent token.
2. Store the outcome, and keep trying until it is stored (7): a store that fails after the
   provider answered (a lock held past the busy timeout, a dropped connection, a database that
   is down) does not lose the answer. The new tokens stay in memory and the write is retried
   with back-off until it lands; each write carries a write id, so a retry that finds its own
   write already there counts as success. Meanwhile `pending` names the grant, and callers get
   503 token_unavailable with a short Retry-After instead of the access token the provider has
   deleted. `store_commit_retries_total` counts the retries.
3. Refresh ahead of need (6): after a success the next refresh is scheduled at
   `lifetime_fraction` of the new token's life, no later than `min_margin` before expiry, with
   jitter. A success without a usable access token still stores the new refresh token, and backs
   off instead of rotating again at once.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from broker.config import ProviderConfig
from broker.errors import (
    ConflictError,
    IdpAmbiguous,
    IdpError,
    IdpRejected,
    StoreUnavailable,
)
from broker.idp.http import MAX_CALL_SECONDS
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
# A send needs this much lease left: the longest call, and a margin for the clocks.
LEASE_NEEDED = timedelta(seconds=MAX_CALL_SECONDS + 5)
# How long a request that reached the provider may still be processed there after it was sent
# (the longest call, and a margin): an introspection answering "active" is believed only once
# the last send that may have reached the provider is at least this old, since until then a
# request of ours (or of a broker that died) may yet rotate the token.
IN_FLIGHT = timedelta(seconds=MAX_CALL_SECONDS + 5)
# Retrying a store write: 0.2 s doubling to 5 s, with jitter.
STORE_RETRY_BASE = 0.2
STORE_RETRY_CAP = 5.0
# The refresher's logger, as before this module was split from it: every event of one refresh
# keeps coming from one logger.
log = structlog.get_logger("broker.refresher")


class TokenClient(Protocol):
    """What the refresher needs from a provider (ProviderClient; a model IdP in tests)."""

    async def prepare(self) -> None:
        """Resolve what a refresh needs before its token may leave; IdpError if it cannot."""
        ...

    async def refresh(self, refresh_token: Secret) -> TokenResponse:
        """Spend a refresh token; IdpRejected, IdpAmbiguous or IdpError when it fails."""
        ...

    async def introspect(self, token: Secret, hint: str = "refresh_token") -> bool | None:
        """Whether the provider holds `token` active; None when this client may not ask."""
        ...

    @property
    def can_introspect(self) -> bool:
        """Whether the prepared metadata names an introspection endpoint."""
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


class Lease:
    """This process's lease on one grant, as far as it can tell without asking the store.

    The deadline is kept on the monotonic clock, counted from just before the write that set it,
    so it is never later than the deadline the store holds, whatever the wall clock does.
    """

    def __init__(
        self,
        repository: GrantRepository,
        grant: Grant,
        owner: str,
        length: timedelta,
        clock: Callable[[], datetime],
        *,
        taken_at: float,
    ) -> None:
        self._repository = repository
        self._grant = grant
        self._owner = owner
        self._length = length
        self._clock = clock
        self._deadline = taken_at + length.total_seconds()

    def remaining(self) -> float:
        """Seconds of lease left, by this process's reckoning."""
        return self._deadline - time.monotonic()

    async def ensure(self, needed: timedelta = LEASE_NEEDED) -> None:
        """Make sure at least `needed` of lease is left, renewing it if not.

        ConflictError when the lease is no longer ours; StoreUnavailable when it cannot be
        renewed. Either way nothing may be sent.
        """
        if self.remaining() >= needed.total_seconds():
            return
        await self.renew()

    async def renew(self) -> None:
        """Move the deadline a whole lease length ahead."""
        started = time.monotonic()
        if not await self._repository.extend_lease(
            self._grant.id, self._owner, self._clock(), self._length
        ):
            raise ConflictError(f"lost the lease on {self._grant.name}")
        self._deadline = started + self._length.total_seconds()


@dataclass(frozen=True, slots=True)
class Attempt:
    """One refresh of one claimed grant: what it spends, and with which provider."""

    grant: Grant  # as claimed: the intent is recorded
    config: ProviderConfig
    client: TokenClient
    lease: Lease
    recovering: bool  # the claim found an intent: an earlier refresh's outcome is unknown


@dataclass(frozen=True, slots=True)
class Rotated:
    """How a rotation ended: the grant as stored, and a client error that pauses the provider."""

    grant: Grant
    client_error: IdpRejected | None = None


class Rotation:
    """Spends the refresh token of a grant whose lease the caller holds, and stores what follows."""

    def __init__(
        self,
        repository: GrantRepository,
        *,
        policy: RefreshPolicy,
        metrics: Metrics,
        clock: Callable[[], datetime],
        rand: Callable[[], float],
        owner: str,
        pause: Callable[[int], timedelta] = replay_delay,
    ) -> None:
        self._repository = repository
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._rand = rand
        self._owner = owner
        self._pause = pause
        # Grants whose outcome is known but not yet stored: the store is failing.
        self.pending: set[str] = set()

    async def rotate(self, attempt: Attempt) -> Rotated:
        """Spend the attempt's refresh token (or recover an unknown outcome) and store the end."""
        grant = attempt.grant
        grace = attempt.config.refresh_grace
        recovering = attempt.recovering
        # The provider's grace runs from when it first sees the token, so it is counted from
        # the first send: here, the instant the request leaves; when recovering, the stored
        # intent, which was written before that send. Either is no later than the IdP's view.
        first_sent: datetime | None = grant.intent_at if recovering else None
        reason = "a refresh was cut short and its outcome is unknown"
        if recovering:
            log.warning("refresh_outcome_unknown", grant=grant.name, generation=grant.generation)
        sends = 0
        # The latest instant a send of this refresh may have left: when recovering someone
        # else's, the end of the grace window they replayed in (it never sent past it).
        last_sent: datetime | None = (
            grant.intent_at + max(grace, timedelta(0)) if recovering and grant.intent_at else None
        )
        while True:
            if recovering:
                assert first_sent is not None
                # Checked before every send, after every pause: a replay must reach the IdP
                # while its grace lasts, with a margin for the clocks of two machines.
                decision = decide(
                    Outcome.AMBIGUOUS,
                    now=self._clock() + REPLAY_MARGIN,
                    first_sent_at=first_sent,
                    grace=grace,
                    can_introspect=attempt.client.can_introspect,
                )
                if decision is Decision.INTROSPECT:
                    assert last_sent is not None
                    return await self._introspect(attempt, reason, last_sent + IN_FLIGHT)
                if decision is Decision.LOST:
                    return await self._lost(
                        attempt, f"{reason}; the provider's refresh_grace has passed"
                    )
            await attempt.lease.ensure()
            sends += 1
            sent_at, started = self._clock(), time.perf_counter()
            first_sent = first_sent or sent_at
            last_sent = max(last_sent, sent_at) if last_sent else sent_at
            outcome, error, response = await self._call(attempt.client, grant)
            self._count(grant, outcome, time.perf_counter() - started, sends)
            if outcome is Outcome.AMBIGUOUS or (recovering and outcome is Outcome.TRANSIENT):
                # Unknown again (or a replay did not get through): replay while grace lasts,
                # else the check at the top of the loop introspects or gives up.
                recovering, reason = True, str(error)
                if (
                    decide(
                        Outcome.AMBIGUOUS,
                        now=self._clock() + REPLAY_MARGIN,
                        first_sent_at=first_sent,
                        grace=grace,
                    )
                    is Decision.REPLAY
                ):
                    await attempt.lease.renew()
                    await asyncio.sleep(self._pause(sends).total_seconds())
                continue
            return await self._conclude(
                attempt,
                outcome=outcome,
                error=error,
                response=response,
                replayed=recovering,
                # The IdP issued the pair no earlier than it first saw the token; dating it
                # from then never believes a token lives longer than it does.
                issued_at=first_sent if recovering else sent_at,
            )

    # -- outcomes ---------------------------------------------------------------------------

    async def _conclude(
        self,
        attempt: Attempt,
        *,
        outcome: Outcome,
        error: Exception | None,
        response: TokenResponse | None,
        replayed: bool,
        issued_at: datetime,
    ) -> Rotated:
        """Store a known outcome: new tokens, re-authentication, a pause, or a back-off."""
        grant = attempt.grant
        if outcome is Outcome.SUCCESS:
            assert response is not None
            if replayed:
                self._metrics.rotation_recoveries.labels(grant.provider, "recovered").inc()
            return Rotated(await self._commit(attempt, response, issued_at))
        if outcome is Outcome.TERMINAL:
            if replayed:  # the replay was refused: the rotation happened and is lost
                return await self._lost(attempt, str(error))
            return Rotated(
                await self._settle(
                    attempt, GrantState.REAUTH_REQUIRED, str(error), None, grant.refresh_failures
                )
            )
        if outcome is Outcome.CLIENT_ERROR:
            assert isinstance(error, IdpRejected)
            # Nothing about the user's grant is known to be wrong: its schedule and failure
            # count stay; the provider is paused until its registration works again.
            stored = await self._settle(
                attempt,
                GrantState.ACTIVE,
                str(error),
                grant.next_refresh_at,
                grant.refresh_failures,
                keep_intent=replayed,
            )
            return Rotated(stored, client_error=error)
        return Rotated(await self._back_off(attempt, error))

    async def _back_off(
        self, attempt: Attempt, error: Exception | None, *, failures: int | None = None
    ) -> Grant:
        grant = attempt.grant
        count = grant.refresh_failures + 1 if failures is None else failures
        retry_after = error.retry_after if isinstance(error, IdpError) else None
        delay = backoff(count, self._policy, self._rand(), retry_after)
        return await self._settle(
            attempt, GrantState.ACTIVE, str(error), self._clock() + delay, count
        )

    async def _introspect(self, attempt: Attempt, reason: str, settled_at: datetime) -> Rotated:
        """Ask the provider whether the old refresh token is still active (RFC 7662).

        "Inactive" is final at once: the token was rotated (or revoked). "Active" is believed
        only from `settled_at` on, when no request that may carry the token can still be at the
        provider; asked sooner, the grant keeps its intent and is asked again then.
        """
        grant = attempt.grant
        assert grant.tokens.refresh_token is not None
        try:
            active = await attempt.client.introspect(grant.tokens.refresh_token)
        except IdpError as exc:
            # Still unknown: keep the intent, and ask again after a back-off.
            log.warning("introspection_failed", grant=grant.name, reason=str(exc))
            failures = grant.refresh_failures + 1
            delay = backoff(failures, self._policy, self._rand(), exc.retry_after)
            stored = await self._settle(
                attempt,
                GrantState.ACTIVE,
                f"{reason}; asking the provider whether it rotated failed ({exc})",
                self._clock() + delay,
                failures,
                keep_intent=True,
            )
            return Rotated(stored)
        if active is None:
            return await self._lost(
                attempt, f"{reason}; the provider does not let this client introspect tokens"
            )
        if not active:
            return await self._lost(
                attempt, f"{reason}; the provider says the old refresh token is no longer active"
            )
        if self._clock() < settled_at:
            # Active now, but a request sent moments ago (by us, or by a broker that died
            # mid-call) may still rotate it: retrying the token now could present a spent one.
            log.info("refresh_outcome_pending", grant=grant.name, generation=grant.generation)
            stored = await self._settle(
                attempt,
                GrantState.ACTIVE,
                f"{reason}; the provider had not rotated yet, asking again once no request "
                "can still be on its way",
                settled_at,
                grant.refresh_failures,
                keep_intent=True,
            )
            return Rotated(stored)
        # Never rotated: the token is unspent, and no request that carried it is still on its
        # way. Retry it after a short back-off.
        self._metrics.rotation_recoveries.labels(grant.provider, "recovered").inc()
        log.info("refresh_never_rotated", grant=grant.name, generation=grant.generation)
        stored = await self._back_off(
            attempt, IdpAmbiguous(f"{reason}; the provider had not rotated"), failures=1
        )
        return Rotated(stored)

    async def _lost(self, attempt: Attempt, reason: str) -> Rotated:
        grant = attempt.grant
        self._metrics.rotation_recoveries.labels(grant.provider, "lost").inc()
        log.error("rotation_lost", grant=grant.name, generation=grant.generation, reason=reason)
        stored = await self._settle(
            attempt,
            GrantState.REAUTH_REQUIRED,
            f"{ROTATION_LOST}: {reason}",
            None,
            grant.refresh_failures,
        )
        return Rotated(stored)

    # -- the call ---------------------------------------------------------------------------

    async def _call(
        self, client: TokenClient, grant: Grant
    ) -> tuple[Outcome, Exception | None, TokenResponse | None]:
        assert grant.tokens.refresh_token is not None
        try:
            response = await client.refresh(grant.tokens.refresh_token)
        except IdpRejected as exc:
            if exc.terminal:
                return Outcome.TERMINAL, exc, None
            if exc.client_error:
                return Outcome.CLIENT_ERROR, exc, None
            return Outcome.TRANSIENT, exc, None
        except IdpAmbiguous as exc:
            return Outcome.AMBIGUOUS, exc, None
        except IdpError as exc:  # never sent (IdpUnreachable), not processed (IdpNotProcessed)
            return Outcome.TRANSIENT, exc, None
        return Outcome.SUCCESS, None, response

    def _count(self, grant: Grant, outcome: Outcome, seconds: float, attempt: int) -> None:
        self._metrics.refresh.labels(grant.provider, outcome.metric_label).inc()
        self._metrics.refresh_duration.labels(grant.provider).observe(seconds)
        log.info(
            "refresh",
            grant=grant.name,
            generation=grant.generation,
            outcome=outcome.value,
            attempt=attempt,
            duration_ms=round(seconds * 1000, 1),
        )

    # -- storing ----------------------------------------------------------------------------

    async def _commit(
        self, attempt: Attempt, response: TokenResponse, issued_at: datetime
    ) -> Grant:
        """Store a successful refresh (the only place a new refresh token is written)."""
        grant, config = attempt.grant, attempt.config
        now = self._clock()
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
            access_token, token_type, expires_in = await self._access_token(attempt, response, now)
        except IdpError as exc:
            # The new refresh token is in hand and must be kept whatever else is wrong.
            problem = f"the refresh response carries no usable access token: {exc}"
            log.warning("refresh_without_access_token", grant=grant.name, reason=str(exc))
        id_token, claims = await self._id_token(attempt, response, now)
        failures = 0
        if problem is None:
            tokens = TokenSet(refresh_token, access_token, id_token)
            issued: datetime | None = issued_at
            expires_at = issued_at + timedelta(seconds=expires_in or ASSUMED_LIFETIME)
            next_refresh = due_at(issued_at, expires_at, self._policy, self._rand())
        else:
            tokens = TokenSet(refresh_token, grant.tokens.access_token, id_token)
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
            claims=claims,
        )
        write_id = secrets.token_hex(16)
        return await self._stored(
            grant,
            write_id,
            lambda: self._repository.commit_refresh(new, grant.generation, write_id, self._clock()),
        )

    async def _id_token(
        self, attempt: Attempt, response: TokenResponse, now: datetime
    ) -> tuple[Secret | None, dict[str, Any]]:
        """The ID token and claims to keep: the refreshed ones once checked (OIDC Core 12.2:
        signature, issuer, audience, and the same `sub`), else those already held.

        A refreshed ID token that fails a check costs nothing but itself: the new refresh and
        access tokens are stored all the same (and for a provider whose access token is an ID
        token claim, the access token's own check decides).
        """
        grant = attempt.grant
        held = grant.tokens.id_token, grant.claims
        if response.id_token is None or "openid" not in attempt.config.scopes:
            return held
        try:
            claims = await attempt.client.check_id_token(response.id_token, nonce=None, now=now)
        except IdpError as exc:
            log.warning("refreshed_id_token_rejected", grant=grant.name, reason=str(exc))
            return held
        if grant.sub is not None and claims.get("sub") != grant.sub:
            log.warning(
                "refreshed_id_token_rejected",
                grant=grant.name,
                reason="its sub is not the grant's",
            )
            return held
        claim = attempt.config.access_token_from.claim
        if claim is not None:  # the token is kept sealed as the access token (as at login)
            claims = {name: value for name, value in claims.items() if name != claim}
        return response.id_token, claims

    async def _access_token(
        self, attempt: Attempt, response: TokenResponse, now: datetime
    ) -> tuple[Secret, str, int | None]:
        """The new access token: from the response, or from a claim of its validated ID token."""
        claim = attempt.config.access_token_from.claim
        if claim is None:
            if response.access_token is None:
                raise IdpError("the refresh response has no access_token")
            return response.access_token, response.token_type, response.expires_in
        if response.id_token is None:
            raise IdpError(f"the refresh response has no ID token carrying {claim}")
        claims = await attempt.client.check_id_token(response.id_token, nonce=None, now=now)
        if attempt.grant.sub is not None and claims.get("sub") != attempt.grant.sub:
            # OIDC Core 12.2: another account's token is never served for this grant.
            raise IdpError(f"the refreshed ID token carrying {claim} names another sub")
        return access_token_in_claim(claims, claim)

    async def _settle(
        self,
        attempt: Attempt,
        state: GrantState,
        error: str | None,
        next_refresh_at: datetime | None,
        failures: int,
        *,
        keep_intent: bool = False,
    ) -> Grant:
        grant = attempt.grant
        write_id = secrets.token_hex(16)
        return await self._stored(
            grant,
            write_id,
            lambda: self._repository.settle(
                grant,
                self._owner,
                self._clock(),
                state=state,
                last_error=error,
                next_refresh_at=next_refresh_at,
                refresh_failures=failures,
                write_id=write_id,
                keep_intent=keep_intent,
            ),
        )

    async def _stored(
        self, grant: Grant, write_id: str, write: Callable[[], Awaitable[Grant]]
    ) -> Grant:
        """Run `write` until it lands (ROTATION.md invariant 7); its own write found is success.

        A StoreUnavailable leaves the outcome in memory and retries with back-off, for as long
        as it takes; a ConflictError after a failed attempt may be that attempt's write having
        landed after all, which the write id tells.
        """
        failures = 0
        try:
            while True:
                try:
                    return await write()
                except ConflictError:
                    if failures == 0:
                        raise
                    landed = await self._own_write(grant, write_id)
                    if landed is None:
                        raise
                    log.info("store_write_found_landed", grant=grant.name, attempts=failures + 1)
                    return landed
                except StoreUnavailable as exc:
                    failures += 1
                    self.pending.add(grant.id)
                    self._metrics.store_commit_retries.inc()
                    delay = min(STORE_RETRY_CAP, STORE_RETRY_BASE * (1 << min(failures - 1, 10)))
                    log.warning(
                        "store_write_retry",
                        grant=grant.name,
                        attempt=failures,
                        retry_in_s=round(delay, 2),
                        reason=str(exc),
                    )
                    await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
        finally:
            self.pending.discard(grant.id)

    async def _own_write(self, grant: Grant, write_id: str) -> Grant | None:
        """The grant as stored if the write `write_id` landed; asked until the store answers."""
        attempt = 0
        while True:
            try:
                return await self._repository.written_by(grant.id, write_id)
            except StoreUnavailable:
                attempt += 1
                await asyncio.sleep(min(STORE_RETRY_CAP, STORE_RETRY_BASE * attempt))
