"""A model identity provider for the refresher's tests, and the wiring of a real broker to it.

`ModelIdp` implements the refresher's `TokenClient` in process, without sockets, and behaves as a
strict-rotation provider does (django-oauth-toolkit with ROTATE_REFRESH_TOKEN,
REFRESH_TOKEN_GRACE_PERIOD_SECONDS and REFRESH_TOKEN_REUSE_PROTECTION on):

- every refresh token is single-use; spending the current one returns a new access + refresh
  pair and makes the old refresh token *spent*;
- inside `grace` after a token was spent, presenting it again returns the same new pair (an
  idempotent retry), as long as that pair's refresh token has not itself been spent;
- presenting a spent token outside grace is *reuse*: the whole token family (every refresh and
  access token descended from the login) is revoked, and the presentation is recorded in
  `violations`, which a test asserts stays empty (ROTATION.md invariant 3);
- the access tokens it issued can be checked with `is_valid(access_token, now)`.

The test decides how the next call fails (`Fault`): before the IdP processes the request
(nothing rotates), after it (the IdP rotated, the client never sees the pair), terminally, or
by killing the broker (`Killed`, a BaseException the refresher does not catch, raised at the
instant a `kill -9` would stop the process). The model reads the test's clock (`HandClock`).

`Incarnation` is one broker process over a store: the real Refresher, GrantService and cache,
built the way `broker.daemon` builds them, with this model as the provider's client.
"""

from __future__ import annotations

import asyncio
import enum
import math
import secrets
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from broker.cache import GrantCache
from broker.config import AccessTokenSource, ProviderConfig
from broker.errors import (
    IdpAmbiguous,
    IdpError,
    IdpNotProcessed,
    IdpRejected,
    IdpUnreachable,
    IdTokenInvalid,
)
from broker.fleet import Fleet, dead_here, this_node
from broker.grants import GrantService, Import
from broker.idp.tokens import TokenResponse
from broker.metrics import Metrics
from broker.model import Grant, Secret
from broker.refresher import LEASE, Refresher
from broker.schedule import RefreshPolicy
from broker.store.nodes import NodeInfo, NodeRepository
from broker.store.repository import GrantRepository

PROVIDER = "p"
T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
ACCESS_LIFETIME = 600  # seconds an access token of the model lives
# Heartbeats do not run against a hand clock: only nodes marked stopped (found dead on this
# machine by a live broker's survey) are dead in these tests.
NODE_TIMEOUT = timedelta(days=365)
RETRY_AFTER = 120  # seconds, sent with Fault.RATE_LIMITED


class Killed(BaseException):
    """The broker process died at this instant (kill -9): nothing after it runs."""


class HandClock:
    """A clock that moves only when the test moves it."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float | timedelta) -> None:
        """Move time forward."""
        step = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        assert step >= timedelta(0), "time only moves forward"
        self.now += step


class Fault(enum.StrEnum):
    """How the next call to the model's token endpoint ends."""

    NONE = "none"
    # Before processing: the request never arrived, nothing rotates.
    UNREACHABLE = "unreachable"  # connection refused: IdpUnreachable
    RATE_LIMITED = "rate_limited"  # 429 with Retry-After: IdpNotProcessed
    UNAVAILABLE = "unavailable"  # a load balancer's 503: IdpNotProcessed
    CLIENT_REJECTED = "client_rejected"  # invalid_client: the registration, not the grant
    TRANSIENT_OAUTH = "transient_oauth"  # a non-terminal OAuth error: IdpRejected
    AMBIGUOUS_BEFORE = "ambiguous_before"  # lost on the way in, but the client cannot know
    REJECTED = "rejected"  # invalid_grant: the refresh token is refused for good
    KILL_BEFORE = "kill_before"  # the broker died after its intent record, before sending
    # After processing: the IdP rotated.
    AMBIGUOUS_AFTER = "ambiguous_after"  # read timeout / reset / 502: IdpAmbiguous
    KILL_AFTER = "kill_after"  # the broker died waiting for the answer
    NO_REFRESH_TOKEN = "no_refresh_token"  # rotated, but the response carries no refresh token
    NO_ACCESS_TOKEN = "no_access_token"  # rotated; the response has an ID token, no access token


BEFORE_PROCESSING = frozenset(
    {
        Fault.UNREACHABLE,
        Fault.RATE_LIMITED,
        Fault.UNAVAILABLE,
        Fault.CLIENT_REJECTED,
        Fault.TRANSIENT_OAUTH,
        Fault.AMBIGUOUS_BEFORE,
        Fault.REJECTED,
        Fault.KILL_BEFORE,
    }
)
TRANSIENT = frozenset(
    {Fault.UNREACHABLE, Fault.RATE_LIMITED, Fault.UNAVAILABLE, Fault.TRANSIENT_OAUTH}
)


@dataclass
class Family:
    """The tokens descended from one login."""

    id: str
    # Refresh tokens, oldest first; the last one is current unless spent. Not in the repr:
    # token values stay out of assertion messages, as they stay out of logs.
    chain: list[str] = field(repr=False)
    revoked: bool = False


@dataclass
class RefreshRecord:
    """One refresh token as the model remembers it."""

    family: Family
    spent_at: datetime | None = None
    refused: bool = False  # rejected for good (Fault.REJECTED)
    successor: TokenResponse | None = None  # what spending it returned
    successor_expires_at: datetime | None = None


@dataclass(frozen=True)
class AccessRecord:
    """One access token as the model remembers it."""

    family: Family
    expires_at: datetime


@dataclass(frozen=True)
class Call:
    """One call to the token endpoint, as the model saw it."""

    at: datetime
    family: str | None
    fault: Fault
    result: str  # rotated, replayed, refused, reuse, unknown, or the fault that ended it


@dataclass
class ModelIdp:
    """A strict-rotation token endpoint (see the module docstring)."""

    clock: Callable[[], datetime]
    grace: timedelta = timedelta(0)
    access_lifetime: int = ACCESS_LIFETIME
    mint: Callable[[str], str] = field(default=lambda prefix: f"{prefix}-{secrets.token_hex(16)}")
    # What a replay inside grace reports as expires_in: the lifetime sent the first time
    # (django-oauth-toolkit re-sends the configured lifetime) or what is left of it.
    replay_expires_in: Literal["original", "remaining"] = "original"
    # How long each call takes on the test's clock (a HandClock): the IdP sees the request
    # at the start, the client its end (or its timeout) this much later.
    latency: timedelta = timedelta(0)
    # While set, calls wait on it before they are processed (a test opens it).
    gate: asyncio.Event | None = None
    faults: list[Fault] = field(default_factory=list)  # the next calls' faults, in order
    # A test's guard against a refresher that never stops calling: past this many calls in
    # all, every call is refused (invalid_grant) and recorded as a violation.
    call_limit: int | None = None
    sticky: Fault | None = None  # the fault of every call while set
    # Whether this client may introspect tokens (RFC 7662); `introspections` counts the asks.
    introspection: bool = False
    introspections: int = 0
    introspection_error: IdpError | None = None  # the next introspection fails with it
    # When set, `prepare` fails with this error (discovery cannot be fetched) and sends nothing.
    prepare_error: IdpError | None = None
    prepares: int = 0
    calls: list[Call] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list, repr=False)  # tokens revoked, in order
    violations: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _refresh: dict[str, RefreshRecord] = field(default_factory=dict, repr=False)
    _access: dict[str, AccessRecord] = field(default_factory=dict, repr=False)
    _id_tokens: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    # -- test-facing ---------------------------------------------------------------------------

    def login(self) -> TokenResponse:
        """A new token family, as a completed authorization code flow would start it."""
        family = Family(id=secrets.token_hex(4), chain=[])
        return self._issue(family, self.clock())

    def fail_next(self, *faults: Fault) -> None:
        """Make the next calls end with these faults, one each."""
        self.faults.extend(faults)

    def family_of(self, refresh_token: Secret | str) -> Family | None:
        """The family a refresh token belongs to."""
        record = self._refresh.get(_plain(refresh_token))
        return None if record is None else record.family

    def current(self, family: Family) -> str:
        """The newest refresh token of a family."""
        return family.chain[-1]

    def is_live(self, refresh_token: Secret | str, now: datetime) -> bool:
        """Whether presenting this refresh token now would be accepted without reuse."""
        record = self._refresh.get(_plain(refresh_token))
        if record is None or record.family.revoked or record.refused:
            return False
        return record.spent_at is None or self._replayable(record, now)

    def is_valid(self, access_token: Secret | str, now: datetime) -> bool:
        """Whether a resource server would accept this access token now."""
        record = self._access.get(_plain(access_token))
        return record is not None and not record.family.revoked and now < record.expires_at

    def expires_at(self, access_token: Secret | str) -> datetime:
        """When an access token really expires at the model."""
        return self._access[_plain(access_token)].expires_at

    @property
    def replays(self) -> int:
        """How many calls were answered as a replay inside grace."""
        return sum(call.result == "replayed" for call in self.calls)

    # -- TokenClient ---------------------------------------------------------------------------

    async def prepare(self) -> None:
        """What discovery would do: nothing, or fail as the test asked, before any send."""
        self.prepares += 1
        if self.prepare_error is not None:
            raise self.prepare_error

    @property
    def can_introspect(self) -> bool:
        """Whether the model offers introspection to this client."""
        return self.introspection

    async def introspect(self, token: Secret, hint: str = "refresh_token") -> bool | None:
        """Whether a refresh token is still unspent (and its family alive), as RFC 7662 would
        say; None when introspection is off."""
        del hint
        if not self.introspection:
            return None
        self.introspections += 1
        if self.introspection_error is not None:
            error, self.introspection_error = self.introspection_error, None
            raise error
        record = self._refresh.get(token.reveal())
        return (
            record is not None
            and not record.family.revoked
            and not record.refused
            and record.spent_at is None
        )

    async def refresh(self, refresh_token: Secret) -> TokenResponse:
        """Spend a refresh token (see the module docstring)."""
        if self.call_limit is not None and len(self.calls) >= self.call_limit:
            self.violations.append(f"more than {self.call_limit} calls: the refresher loops")
            raise IdpRejected("invalid_grant", "call limit", 400)
        fault = self.sticky or (self.faults.pop(0) if self.faults else Fault.NONE)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # a real call yields; concurrent calls overlap here
            if self.gate is not None:
                await self.gate.wait()
            try:
                return self._serve(refresh_token, fault)
            finally:
                self._elapse()
        finally:
            self.in_flight -= 1

    async def check_id_token(
        self,
        id_token: Secret,
        *,
        nonce: str | None,
        now: datetime,
        access_token: Secret | None = None,
    ) -> dict[str, Any]:
        """The claims of an ID token this model issued (it carries no nonce and no at_hash)."""
        del access_token  # no at_hash to check it against
        claims = self._id_tokens.get(id_token.reveal())
        if claims is None:
            raise IdTokenInvalid("the model never issued this ID token")
        if nonce is not None:
            raise IdTokenInvalid("an ID token from a refresh carries no nonce")
        if claims["iat"] > now.timestamp():
            raise IdTokenInvalid("the ID token was issued in the future")
        return dict(claims)

    async def revoke_grant(self, refresh_token: Secret | None, access_token: Secret | None) -> bool:
        """Revoke a grant (RFC 7009): its refresh token's whole family, as DOT does."""
        token = refresh_token or access_token
        if token is None:
            return False
        self.revoked.append(token.reveal())
        record = self._refresh.get(token.reveal())
        if record is not None:
            record.family.revoked = True
        return True

    # -- the token endpoint --------------------------------------------------------------------

    def _elapse(self) -> None:
        """Let the call's latency pass on the shared clock."""
        if self.latency:
            clock = self.clock
            assert isinstance(clock, HandClock), "latency moves a HandClock"
            clock.advance(self.latency)

    def _serve(self, refresh_token: Secret, fault: Fault) -> TokenResponse:
        now = self.clock()
        record = self._refresh.get(refresh_token.reveal())
        family = None if record is None else record.family.id
        if fault in BEFORE_PROCESSING:
            self.calls.append(Call(now, family, fault, fault.value))
            raise _before(fault)
        result, response = self._process(record, now)
        self.calls.append(Call(now, family, fault, result if fault is Fault.NONE else fault.value))
        if response is None:
            raise IdpRejected("invalid_grant", "the refresh token is not valid", 400)
        if fault is Fault.AMBIGUOUS_AFTER:
            raise IdpAmbiguous("the token endpoint did not answer in time (read timeout)")
        if fault is Fault.KILL_AFTER:
            raise Killed
        if fault is Fault.NO_REFRESH_TOKEN:
            return _without(response, refresh_token=True)
        if fault is Fault.NO_ACCESS_TOKEN:
            return _without(response, access_token=True)
        return response

    def _process(
        self, record: RefreshRecord | None, now: datetime
    ) -> tuple[str, TokenResponse | None]:
        """Rotate, replay inside grace, or refuse; reuse outside grace revokes the family."""
        if record is None:
            self.violations.append(f"{now}: presented a refresh token the IdP never issued")
            return "unknown", None
        if record.family.revoked or record.refused:
            return "refused", None
        if record.spent_at is None:
            response = self._issue(record.family, now)
            record.spent_at = now
            record.successor = response
            assert response.access_token is not None
            record.successor_expires_at = self._access[response.access_token.reveal()].expires_at
            return "rotated", response
        if self._replayable(record, now):
            assert record.successor is not None
            assert record.successor_expires_at is not None
            if self.replay_expires_in == "original":
                return "replayed", record.successor
            left = math.floor((record.successor_expires_at - now).total_seconds())
            return "replayed", _with_expires_in(record.successor, max(1, left))
        record.family.revoked = True
        self.violations.append(
            f"{now}: reuse of a refresh token spent at {record.spent_at} "
            f"(grace {self.grace.total_seconds()} s): family {record.family.id} revoked"
        )
        return "reuse", None

    def _replayable(self, record: RefreshRecord, now: datetime) -> bool:
        # As django-oauth-toolkit: inside grace (open on the right), and only the immediately
        # preceding token, i.e. while the pair it produced has not been spent in turn.
        if record.spent_at is None or record.successor is None:
            return False
        assert record.successor.refresh_token is not None
        successor = self._refresh[record.successor.refresh_token.reveal()]
        return now < record.spent_at + self.grace and successor.spent_at is None

    def _issue(self, family: Family, now: datetime) -> TokenResponse:
        access, refresh, id_token = self.mint("at"), self.mint("rt"), self.mint("idt")
        self._access[access] = AccessRecord(family, now + timedelta(seconds=self.access_lifetime))
        self._refresh[refresh] = RefreshRecord(family)
        self._id_tokens[id_token] = {"sub": f"sub-{family.id}", "iat": int(now.timestamp())}
        family.chain.append(refresh)
        return TokenResponse(
            access_token=Secret(access),
            token_type="Bearer",
            expires_in=self.access_lifetime,
            refresh_token=Secret(refresh),
            id_token=Secret(id_token),
            scope=("openid",),
        )


def _plain(token: Secret | str) -> str:
    return token.reveal() if isinstance(token, Secret) else token


def _before(fault: Fault) -> BaseException:
    """The error a fault raises when the request is never processed."""
    errors: dict[Fault, Callable[[], BaseException]] = {
        Fault.UNREACHABLE: lambda: IdpUnreachable(
            "could not connect to the token endpoint (connection refused)"
        ),
        Fault.RATE_LIMITED: lambda: IdpNotProcessed(
            "the token endpoint answered 429", retry_after=RETRY_AFTER
        ),
        Fault.UNAVAILABLE: lambda: IdpNotProcessed(
            "the token endpoint answered 503", retry_after=RETRY_AFTER
        ),
        Fault.CLIENT_REJECTED: lambda: IdpRejected(
            "invalid_client", "client authentication failed", 401
        ),
        Fault.TRANSIENT_OAUTH: lambda: IdpRejected("temporarily_unavailable", "try later", 400),
        Fault.AMBIGUOUS_BEFORE: lambda: IdpAmbiguous(
            "the connection was reset after the request was sent"
        ),
        Fault.REJECTED: lambda: IdpRejected("invalid_grant", "the refresh token has expired", 400),
        Fault.KILL_BEFORE: Killed,
    }
    return errors[fault]()


def _without(
    response: TokenResponse, *, refresh_token: bool = False, access_token: bool = False
) -> TokenResponse:
    return TokenResponse(
        access_token=None if access_token else response.access_token,
        token_type=response.token_type,
        expires_in=response.expires_in,
        refresh_token=None if refresh_token else response.refresh_token,
        id_token=response.id_token,
        scope=response.scope,
    )


def _with_expires_in(response: TokenResponse, expires_in: int) -> TokenResponse:
    return TokenResponse(
        access_token=response.access_token,
        token_type=response.token_type,
        expires_in=expires_in,
        refresh_token=response.refresh_token,
        id_token=response.id_token,
        scope=response.scope,
    )


# -- a broker process wired to the model -------------------------------------------------------


def provider_config(grace: timedelta = timedelta(0), *, rotates: bool = True) -> ProviderConfig:
    """The config of the model's provider, named PROVIDER."""
    return ProviderConfig(
        name=PROVIDER,
        issuer="https://idp.example",
        authorization_endpoint=None,
        token_endpoint=None,
        revocation_endpoint=None,
        jwks_uri=None,
        userinfo_endpoint=None,
        client_id="token-broker",
        client_secret_file=None,
        client_auth="none",
        scopes=("openid",),
        redirect_uri="http://127.0.0.1:8000/oauth-callback/",
        access_token_from=AccessTokenSource(),
        refresh_grace=grace,
        rotates_refresh_tokens=rotates,
    )


def dead_pid() -> int:
    """The pid of a process that ran on this host and has exited (and been reaped); a new one
    each time, as each crashed broker had its own."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def dead_node() -> NodeInfo:
    """A node of this machine whose process has exited, as a crashed broker leaves behind."""
    node = replace(this_node(), pid=dead_pid())
    assert dead_here(node, this_node()), "the reaped child's pid is in use again"
    return node


async def node_owner(repository: GrantRepository, **where: Any) -> str:
    """The id of a node registered in the store as this machine's, changed by `where` (another
    host, another pid, another container's pid namespace)."""
    node = replace(this_node(), **where)
    await NodeRepository(repository.engine, NODE_TIMEOUT).register(node, T0)
    return node.id


async def dead_owner(repository: GrantRepository) -> str:
    """The id of a registered node whose process on this machine is gone (a lease owner that a
    live broker may take over at once)."""
    node = dead_node()
    await NodeRepository(repository.engine, NODE_TIMEOUT).register(node, T0)
    return node.id


@dataclass
class Incarnation:
    """One broker process: refresher, service and cache over a repository, and its metrics."""

    repository: GrantRepository
    refresher: Refresher
    service: GrantService
    cache: GrantCache
    metrics: Metrics
    fleet: Fleet
    joined: bool = False

    @classmethod
    def build(
        cls,
        repository: GrantRepository,
        idp: ModelIdp,
        clock: Callable[[], datetime],
        *,
        grace: timedelta = timedelta(0),
        rotates: bool = True,
        node: NodeInfo | None = None,
        policy: RefreshPolicy | None = None,
        max_concurrency: int = 8,
        rand: Callable[[], float] = lambda: 0.5,
        providers: Mapping[str, ProviderConfig] | None = None,
    ) -> Incarnation:
        """Compose the pieces as broker.daemon does (with the daemon's live map of providers,
        which a reload replaces, when given)."""
        if providers is None:
            providers = {PROVIDER: provider_config(grace, rotates=rotates)}
        policy = policy or RefreshPolicy()
        metrics = Metrics(providers)
        cache = GrantCache()
        fleet = Fleet(
            NodeRepository(repository.engine, NODE_TIMEOUT),
            node or this_node(),
            clock,
            lease=LEASE,
            known_wait=0,  # the harness's nodes beat only when a test says so
        )
        refresher = Refresher(
            repository,
            cache=cache,
            clients={PROVIDER: idp},
            providers=providers,
            policy=policy,
            max_concurrency=max_concurrency,
            metrics=metrics,
            clock=clock,
            rand=rand,
            fleet=fleet,
        )
        fleet.in_flight = refresher.in_flight
        service = GrantService(
            repository,
            providers,
            {PROVIDER: idp},
            cache=cache,
            refresher=refresher,
            policy=policy,
            clock=clock,
            rand=rand,
        )
        return cls(repository, refresher, service, cache, metrics, fleet)

    async def join(self) -> None:
        """Register this broker's node in the store (once), as the daemon does at start."""
        if not self.joined:
            await self.fleet.join()
            self.joined = True

    async def start(self) -> int:
        """Join, load the store and recover interrupted refreshes, as the daemon starts."""
        await self.join()
        await self.service.load()
        return await self.refresher.recover()

    async def login(self, idp: ModelIdp, user: str, now: datetime) -> Grant:
        """Store a new grant for `user` from a fresh token family at the model."""
        await self.join()
        tokens = idp.login()
        assert tokens.refresh_token is not None
        await self.service.import_grant(
            Import(
                provider=PROVIDER,
                user=user,
                refresh_token=tokens.refresh_token,
                access_token=tokens.access_token,
                expires_in=tokens.expires_in,
            ),
            now,
        )
        grant = self.cache.get(PROVIDER, user)
        assert grant is not None
        return grant

    def cached(self, user: str) -> Grant:
        """The grant this process serves `user` from."""
        grant = self.cache.get(PROVIDER, user)
        assert grant is not None
        return grant

    def count(self, name: str, outcome: str) -> float:
        """A counter's value for PROVIDER and `outcome` (e.g. refresh, "success")."""
        value = self.metrics.registry.get_sample_value(
            f"token_broker_{name}_total", {"provider": PROVIDER, "outcome": outcome}
        )
        return 0.0 if value is None else value

    async def stored(self, user: str) -> Grant:
        """The grant for `user` as the store has it now."""
        grant = await self.repository.get(PROVIDER, user)
        assert grant is not None
        return grant
