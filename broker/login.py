"""Logging a user in, from POST /v1/logins to the grant: the authorization-code flow with PKCE
here, the device authorization grant (RFC 8628) in `broker.login_device`, and how either ends
in `broker.login_finish`.

begin()     by the method asked for; with none, the device grant for a provider whose
            redirect no callback listener serves and that offers a device endpoint, else the
            code flow
start()     state, nonce and PKCE verifier are made and stored sealed; the authorize URL
            carries state, nonce, the S256 challenge
complete()  the redirect's state claims the login once; `error`, a foreign `iss`, a failed
            exchange or a bad ID token end it as failed and store nothing; otherwise the
            grant is stored (a different `sub` than the grant holds needs `force`); tokens
            a failed login got from the exchange are revoked at the provider, if it can
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from broker.config import ProviderConfig
from broker.errors import GrantNotFound, LoginError
from broker.grants import GrantService, LoginResult
from broker.idp.client import Pkce, ProviderClient
from broker.idp.tokens import TokenResponse
from broker.login_device import DeviceLogins, DeviceLoginStarted
from broker.login_finish import LoginFinisher, reachable_metadata
from broker.store.logins import CODE, DEVICE, LoginRecord, LoginRepository, PendingLogin

__all__ = [
    "LOGIN_TTL",
    "METHODS",
    "CallbackOutcome",
    "DeviceLoginStarted",
    "LoginService",
    "LoginStarted",
]

LOGIN_TTL = timedelta(minutes=10)
METHODS = (CODE, DEVICE)  # what POST /v1/logins accepts as "method"
log = structlog.get_logger("broker.login")


@dataclass(frozen=True, slots=True)
class LoginStarted:
    """What POST /v1/logins answers for the code flow."""

    login_id: str
    authorize_url: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class CallbackOutcome:
    """How a redirect ended, for the page the browser shows."""

    ok: bool
    message: str


class LoginService:
    """Starts logins, completes them when the IdP redirects back, and polls device logins."""

    def __init__(
        self,
        logins: LoginRepository,
        grants: GrantService,
        clients: Mapping[str, ProviderClient],
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        redirect_served: Callable[[ProviderConfig], bool] = lambda _provider: True,
    ) -> None:
        self._logins = logins
        self._grants = grants
        self._clients = clients
        self._redirect_served = redirect_served
        self._finisher = LoginFinisher(logins, grants, clients)
        self._devices = DeviceLogins(logins, grants, clients, self._finisher, clock)

    async def begin(
        self, provider: str, user: str, force: bool, method: str | None, now: datetime
    ) -> LoginStarted | DeviceLoginStarted:
        """Start a login by `method`; None picks the device grant where no redirect can come."""
        config = self._grants.check_address(provider, user)
        if method is None and not self._redirect_served(config):
            metadata = await reachable_metadata(self._clients[provider])
            method = DEVICE if metadata.device_authorization_endpoint else CODE
        if method == DEVICE:
            return await self._devices.start(provider, user, force, now)
        return await self.start(provider, user, force, now)

    async def start(self, provider: str, user: str, force: bool, now: datetime) -> LoginStarted:
        """Create a pending login and the URL to send the user to."""
        self._grants.check_address(provider, user)
        client = self._clients[provider]
        metadata = await reachable_metadata(client)
        login_id = secrets.token_urlsafe(24)
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32) if client.wants_id_token else None
        pkce = Pkce.new()
        expires_at = now + LOGIN_TTL
        await self._logins.insert(
            login_id=login_id,
            provider=provider,
            user=user,
            state=state,
            nonce=nonce,
            code_verifier=pkce.verifier,
            force=force,
            now=now,
            expires_at=expires_at,
        )
        log.info(
            "login_started", grant=f"{provider}/{user}", login=login_id, force=force, method=CODE
        )
        url = client.authorize_url(metadata, state=state, nonce=nonce, pkce=pkce)
        return LoginStarted(login_id=login_id, authorize_url=url, expires_at=expires_at)

    async def status(self, login_id: str, now: datetime) -> LoginRecord:
        """The progress of a login."""
        record = await self._logins.get(login_id, now)
        if record is None:
            raise GrantNotFound(f"no login {login_id!r}")
        return record

    async def complete(self, params: Mapping[str, str], now: datetime) -> CallbackOutcome:
        """Handle the IdP's redirect; nothing is stored unless every check passes."""
        state = params.get("state")
        if not state:
            return CallbackOutcome(False, "The redirect carries no state; start a new login.")
        try:
            pending = await self._logins.claim(state, now)
        except LoginError as exc:
            log.warning("login_callback_refused", reason=str(exc))
            return CallbackOutcome(False, str(exc).capitalize() + ".")
        grant = f"{pending.provider}/{pending.user}"

        async def exchange(issued: list[TokenResponse]) -> LoginResult:
            return await self._finish(pending, params, now, issued)

        reason = await self._finisher.conclude(pending, exchange, now)
        if reason is None:
            return CallbackOutcome(
                True, f"Signed in: {grant} is stored. You may close this window."
            )
        return CallbackOutcome(False, f"Login for {grant} failed: {reason}.")

    async def stop(self) -> None:
        """Stop polling device logins; those still pending end as failed."""
        await self._devices.stop()

    async def _finish(
        self,
        pending: PendingLogin,
        params: Mapping[str, str],
        now: datetime,
        issued: list[TokenResponse],
    ) -> LoginResult:
        provider = pending.provider
        client = self._clients.get(provider)
        if client is None:  # the config changed since the login started
            raise LoginError(f"provider {provider} is no longer configured")
        if "error" in params:
            description = params.get("error_description")
            detail = f" ({description[:200]})" if description else ""
            raise LoginError(f"the provider answered {params['error'][:64]}{detail}")
        metadata = await client.metadata()
        iss = params.get("iss")
        # RFC 9207: an `iss` naming another issuer means the response came from a mix-up.
        if iss is not None and iss.rstrip("/") != (metadata.issuer or "").rstrip("/"):
            raise LoginError("the redirect's iss does not name this provider's issuer")
        if iss is None and metadata.iss_parameter_supported:
            raise LoginError("the provider promises an iss parameter but the redirect has none")
        code = params.get("code")
        if not code:
            raise LoginError("the redirect carries no authorization code")
        if pending.code_verifier is None:
            raise LoginError("the login has no PKCE verifier: start a new one")
        tokens = await client.exchange_code(code, pending.code_verifier)
        issued.append(tokens)
        return await self._finisher.result(pending, tokens, now)
