"""The nouns of the broker: secrets, grants and the states a grant moves through."""

from __future__ import annotations

import enum
import hmac
import re
from dataclasses import dataclass, field, replace
from datetime import datetime

USER_RE = re.compile(r"[A-Za-z0-9._@-]{1,128}")
PROVIDER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Secret:
    """A secret string whose repr and str never show the value.

    The value is reachable only through `reveal()`, so a grep for `reveal(` finds every place
    a token leaves the wrapper.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        """The plaintext; call only where it is sent to the IdP, sealed, or served."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not picklable")


class GrantState(enum.StrEnum):
    """Where a grant stands: refreshable, waiting for a person, or gone."""

    ACTIVE = "active"
    REAUTH_REQUIRED = "reauth_required"
    REVOKED = "revoked"


def grant_name(provider: str, user: str) -> str:
    """The `PROVIDER/USER` address of a grant, used in logs and messages."""
    return f"{provider}/{user}"


@dataclass(frozen=True, slots=True)
class TokenSet:
    """The secrets of one grant at one generation; any may be absent."""

    refresh_token: Secret | None = None
    access_token: Secret | None = None
    id_token: Secret | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """One user's standing authorization at one provider, as stored."""

    id: str
    provider: str
    user: str
    state: GrantState
    generation: int
    tokens: TokenSet
    sub: str | None = None
    scopes: tuple[str, ...] = ()
    token_type: str = "Bearer"
    access_expires_at: datetime | None = None
    next_refresh_at: datetime | None = None
    last_error: str | None = None
    key_id: str | None = None
    claims: dict[str, object] = field(default_factory=dict)
    access_issued_at: datetime | None = None
    refresh_failures: int = 0
    # Set, durably, just before this generation's refresh token is sent to the IdP; cleared
    # when the outcome is stored. Found set at start-up, it means a refresh whose outcome is
    # unknown (the previous process died mid-call).
    intent_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # The store's change sequence value of this write: orders writes of one row (with the
    # generation), never the wall clock (ROTATION.md invariant 9).
    version: int = 0

    @property
    def name(self) -> str:
        """`PROVIDER/USER`."""
        return grant_name(self.provider, self.user)

    def effective_state(self, now: datetime) -> GrantState:
        """The state callers see: an active grant with no refresh token dies with its token."""
        return _effective_state(
            self.state, self.tokens.refresh_token is not None, self.access_ttl(now)
        )

    def access_ttl(self, now: datetime) -> float:
        """Seconds the access token still lives at `now`; 0 when absent or expired."""
        if self.tokens.access_token is None or self.access_expires_at is None:
            return 0.0
        return max(0.0, (self.access_expires_at - now).total_seconds())


def _effective_state(state: GrantState, has_refresh_token: bool, access_ttl: float) -> GrantState:
    if state is GrantState.ACTIVE and not has_refresh_token and access_ttl <= 0:
        return GrantState.REAUTH_REQUIRED
    return state


@dataclass(frozen=True, slots=True)
class GrantSummary:
    """What admins see of a grant: every field but the secrets."""

    provider: str
    user: str
    sub: str | None
    state: GrantState
    scopes: tuple[str, ...]
    access_expires_at: datetime | None
    next_refresh_at: datetime | None
    generation: int
    last_error: str | None
    has_refresh_token: bool

    @classmethod
    def of(cls, grant: Grant, now: datetime | None = None) -> GrantSummary:
        """The summary of a stored grant, with the state callers see at `now` when given."""
        return cls.seen(
            cls(
                provider=grant.provider,
                user=grant.user,
                sub=grant.sub,
                state=grant.state,
                scopes=grant.scopes,
                access_expires_at=grant.access_expires_at,
                next_refresh_at=grant.next_refresh_at,
                generation=grant.generation,
                last_error=grant.last_error,
                has_refresh_token=grant.tokens.refresh_token is not None,
            ),
            has_access_token=grant.tokens.access_token is not None,
            now=now,
        )

    @classmethod
    def seen(
        cls, stored: GrantSummary, *, has_access_token: bool, now: datetime | None
    ) -> GrantSummary:
        """A summary as stored, with the state callers see at `now` when given (the rule of
        `Grant.effective_state`, read from which tokens there are: no secret is needed)."""
        if now is None:
            return stored
        ttl = 0.0
        if has_access_token and stored.access_expires_at is not None:
            ttl = (stored.access_expires_at - now).total_seconds()
        state = _effective_state(stored.state, stored.has_refresh_token, ttl)
        if state is stored.state:
            return stored
        return replace(
            stored,
            state=state,
            last_error=stored.last_error
            or "the access token expired and there is no refresh token: log in again",
        )
