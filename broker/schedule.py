"""When to refresh, how long to back off, and what each refresh outcome leads to.

Pure: no I/O and no clock reads. Every function takes `now` and, where randomness is wanted,
a number `rand` in [0, 1), so the refresher's decisions can be tested exactly.

A failed refresh is first put in one of three classes by what the provider can have done
with it (`failure_class`, ROTATION.md invariant 4):

    never sent      nothing left the broker: refused, DNS, TLS, a failure fetching discovery
                    or keys (which happens before the intent is written)
    not processed   the provider said it did not act: 429, 503, another 4xx, an OAuth error
    ambiguous       sent, and the answer is unknown: read timeout, reset after send, 500, 502,
                    504, a 200 that cannot be used, a process killed mid-call

and each outcome leads to one decision (`decide`):

    outcome of one refresh            decision
    ─────────────────────────────     ─────────────────────────────────────────────────────
    success                           COMMIT      store the new tokens (generation + 1)
    invalid_grant                     REAUTH      grant -> reauth_required; keep serving the old
                                                  access token until it really expires
    invalid_client,                   PAUSE       the client's registration, not the user: pause
      unauthorized_client                         the provider, leave every grant as it is
    never sent, not processed         BACKOFF     keep everything; try again later with the same
                                                  token (exponential, jittered, Retry-After)
    ambiguous (may have rotated)      REPLAY      inside the provider's refresh_grace, counted
                                                  from the first send: present it again
                                      INTROSPECT  outside it, where the provider lets this client
                                                  introspect: ask whether the old refresh token is
                                                  still active (active: never rotated, BACKOFF)
                                      LOST        else: reauth_required, rotation_lost
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

# Back-off for transient failures: 5 s, 10 s, 20 s ... capped at 10 minutes.
BACKOFF_BASE = timedelta(seconds=5)
BACKOFF_CAP = timedelta(minutes=10)
RETRY_AFTER_CAP = timedelta(hours=1)
ROTATION_LOST = "rotation_lost"


class Failure(enum.StrEnum):
    """What the provider can have done with a refresh request that failed."""

    NEVER_SENT = "never_sent"
    NOT_PROCESSED = "not_processed"
    AMBIGUOUS = "ambiguous"


# Statuses with which a server (or a load balancer in front of it) says it did not act.
NOT_PROCESSED_STATUSES = frozenset({429, 503})


def failure_class(*, sent: bool, status: int | None) -> Failure:
    """The class of a failed request: sent or not, and the HTTP status of a complete answer.

    `status` is None when no complete answer came (a timeout or reset after sending). A 4xx
    means the server refused the request without acting, and a 3xx that something in front of
    it redirected the request elsewhere; 429 and 503 say so explicitly. Any other answer that
    is not a usable success (500, 502, 504, other 5xx, a 200 whose body cannot be used) may
    come after the provider acted.
    """
    if not sent:
        return Failure.NEVER_SENT
    if status is None:
        return Failure.AMBIGUOUS
    if status in NOT_PROCESSED_STATUSES or 300 <= status < 500:
        return Failure.NOT_PROCESSED
    return Failure.AMBIGUOUS


class Outcome(enum.StrEnum):
    """How one call to the token endpoint ended, as far as rotation is concerned.

    The values of the first four are the `outcome` label of `token_broker_refresh_total`; a
    client error is counted there as `transient_error` (nothing about the grant is final).
    """

    SUCCESS = "success"
    TERMINAL = "invalid_grant"
    TRANSIENT = "transient_error"
    AMBIGUOUS = "ambiguous"
    CLIENT_ERROR = "client_error"

    @property
    def metric_label(self) -> str:
        """The refresh_total outcome this counts as."""
        return "transient_error" if self is Outcome.CLIENT_ERROR else self.value


class Decision(enum.StrEnum):
    """What the refresher does next."""

    COMMIT = "commit"
    REAUTH = "reauth"
    PAUSE = "pause"
    BACKOFF = "backoff"
    REPLAY = "replay"
    INTROSPECT = "introspect"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    """The `[refresh]` settings the schedule needs."""

    lifetime_fraction: float = 0.75
    min_margin: timedelta = timedelta(seconds=60)
    jitter: float = 0.1
    backoff_base: timedelta = BACKOFF_BASE
    backoff_cap: timedelta = BACKOFF_CAP


def due_at(
    issued_at: datetime, expires_at: datetime, policy: RefreshPolicy, rand: float
) -> datetime:
    """When to refresh an access token issued at `issued_at` that expires at `expires_at`.

    At `lifetime_fraction` of its life, but no later than `min_margin` before expiry; jitter
    moves it earlier (never later) by up to `jitter` of the wait, so grants issued together do
    not all come due together. A token too short-lived for the margin is refreshed at the
    smaller of the fraction and half its life.
    """
    life = expires_at - issued_at
    if life <= timedelta(0):
        return issued_at
    target = issued_at + life * policy.lifetime_fraction
    latest = expires_at - policy.min_margin
    if latest <= issued_at:
        target = issued_at + life * min(policy.lifetime_fraction, 0.5)
    elif latest < target:
        target = latest
    return target - (target - issued_at) * (policy.jitter * rand)


def backoff(
    failures: int, policy: RefreshPolicy, rand: float, retry_after: float | None = None
) -> timedelta:
    """The wait after the `failures`-th transient failure in a row (1 for the first).

    Exponential with "equal jitter" (half fixed, half random) so retries spread out but never
    collapse to zero; at least the IdP's Retry-After, itself capped at an hour.
    """
    exponent = max(0, min(failures - 1, 30))
    step = min(policy.backoff_base * (1 << exponent), policy.backoff_cap)
    delay = step / 2 + (step / 2) * rand
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(timedelta(seconds=retry_after), RETRY_AFTER_CAP))
    return delay


def decide(
    outcome: Outcome,
    *,
    now: datetime,
    first_sent_at: datetime,
    grace: timedelta,
    can_introspect: bool = False,
) -> Decision:
    """What follows one refresh outcome (see the table in this module's docstring)."""
    if outcome is Outcome.SUCCESS:
        return Decision.COMMIT
    if outcome is Outcome.TERMINAL:
        return Decision.REAUTH
    if outcome is Outcome.CLIENT_ERROR:
        return Decision.PAUSE
    if outcome is Outcome.TRANSIENT:
        return Decision.BACKOFF
    # The IdP may have rotated when it first saw the token; its grace counts from then, and
    # it saw the token no earlier than we first sent it.
    if in_grace(now=now, first_sent_at=first_sent_at, grace=grace):
        return Decision.REPLAY
    return Decision.INTROSPECT if can_introspect else Decision.LOST


def in_grace(*, now: datetime, first_sent_at: datetime, grace: timedelta) -> bool:
    """Whether a refresh token first sent at `first_sent_at` may still be presented again."""
    return grace > timedelta(0) and now < first_sent_at + grace


def replay_delay(attempt: int) -> timedelta:
    """A short pause before replaying inside grace: 0.5 s, 1 s, 2 s ... at most 5 s."""
    return min(
        timedelta(milliseconds=500) * (1 << max(0, min(attempt - 1, 10))), timedelta(seconds=5)
    )


def needs_refresh(expires_at: datetime | None, now: datetime, min_ttl: float) -> bool:
    """Whether a token must be refreshed before it is served to a caller asking for `min_ttl`."""
    if expires_at is None:
        return True
    remaining = (expires_at - now).total_seconds()
    return remaining <= 0 or remaining < min_ttl
