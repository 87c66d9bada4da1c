"""Device logins (RFC 8628): the daemon asks the provider for codes and polls until it answers.

start()   the provider's device authorization answer is sealed in the store and a task, kept by
          `Tasks`, polls the token endpoint at the provider's interval (slow_down adds 5 s);
          a second device login for a grant whose device login this process polls joins it:
          the same codes, one poller (`force`, when the second one asks for it, carries over)
poller    ends the login when tokens come (claimed, then finished like a redirect's: the ID
          token checked without a nonce, or without one the `sub` from the userinfo endpoint),
          when the provider refuses (access_denied, expired_token, unauthorized_client, ...),
          when the code expires, or when the daemon stops (`stop`: the login fails, saying so)

The poller lives in the daemon, so a login outlives the command that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from broker.errors import BadRequest, IdpError, IdpRejected, LoginError, TokenUnavailable
from broker.grants import GrantService, LoginResult
from broker.idp.client import ProviderClient
from broker.idp.device import (
    DeviceAuthorization,
    Granted,
    Waiting,
    refusal_reason,
    wait_for_approval,
)
from broker.idp.tokens import TokenResponse
from broker.login_finish import LoginFinisher, reachable_metadata
from broker.store.logins import DEVICE, LoginRepository
from broker.tasks import Tasks

STOPPED = "the broker stopped before the login completed: start a new one"
log = structlog.get_logger("broker.login")


@dataclass(frozen=True, slots=True)
class DeviceLoginStarted:
    """What POST /v1/logins answers for a device login (a new one, or the one already pending
    for the grant)."""

    login_id: str
    verification_uri: str
    verification_uri_complete: str | None
    user_code: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class _Poll:
    """A device login this process polls."""

    grant: str
    login_id: str
    device: DeviceAuthorization
    expires_at: datetime


class DeviceLogins:
    """Starts device logins and polls each until the provider answers for good."""

    def __init__(
        self,
        logins: LoginRepository,
        grants: GrantService,
        clients: Mapping[str, ProviderClient],
        finisher: LoginFinisher,
        clock: Callable[[], datetime],
    ) -> None:
        self._logins = logins
        self._grants = grants
        self._clients = clients
        self._finisher = finisher
        self._clock = clock
        self._tasks = Tasks()
        self._polls: dict[str, _Poll] = {}  # by grant name: one poller per grant at most
        self._starting: dict[str, asyncio.Lock] = {}

    async def start(
        self, provider: str, user: str, force: bool, now: datetime
    ) -> DeviceLoginStarted:
        """Ask the provider for a device code and poll for its approval in the background.

        A grant whose device login this process is polling already gets that login back.
        """
        self._grants.check_address(provider, user)
        grant = f"{provider}/{user}"
        async with self._starting.setdefault(grant, asyncio.Lock()):
            joined = await self._join(provider, user, force, now)
            if joined is not None:
                return joined
            client = self._clients[provider]
            metadata = await reachable_metadata(client)
            endpoint = metadata.device_authorization_endpoint
            if endpoint is None:
                raise BadRequest(
                    f"provider {provider} offers no device authorization endpoint (RFC 8628); "
                    f"set device_authorization_endpoint in [providers.{provider}] if it has "
                    "one, or log in without --device"
                )
            device = await self._device_authorization(client, endpoint)
            login_id = secrets.token_urlsafe(24)
            expires_at = now + timedelta(seconds=device.expires_in)
            await self._logins.insert_device(
                login_id=login_id,
                provider=provider,
                user=user,
                device=device.as_json(),
                force=force,
                now=now,
                expires_at=expires_at,
            )
            self._polls[grant] = _Poll(grant, login_id, device, expires_at)
            self._tasks.spawn(self._poll(client, grant, login_id), name=f"device-login {grant}")
        log.info(
            "login_started",
            grant=grant,
            login=login_id,
            force=force,
            method=DEVICE,
            expires_in=device.expires_in,
            interval=device.interval,
        )
        return _device_started(login_id, device, expires_at)

    async def _join(
        self, provider: str, user: str, force: bool, now: datetime
    ) -> DeviceLoginStarted | None:
        """The device login this process polls for the grant, if it is still pending."""
        polled = self._polls.get(f"{provider}/{user}")
        if polled is None:
            return None
        pending = await self._logins.pending_device(provider, user, now)
        if pending is None or pending.id != polled.login_id:
            return None
        if force and not pending.force:
            await self._logins.insist_on_force(pending.id)
        log.info("login_joined", grant=f"{provider}/{user}", login=pending.id, force=force)
        device = DeviceAuthorization.from_json(pending.device)
        return _device_started(pending.id, device, pending.expires_at)

    async def _device_authorization(
        self, client: ProviderClient, endpoint: str
    ) -> DeviceAuthorization:
        try:
            return await client.device_authorization(endpoint)
        except IdpRejected as exc:
            reason = refusal_reason(exc.error, client.config.client_id)
            raise BadRequest(reason or f"provider {client.name} refused: {exc}") from None
        except IdpError as exc:
            raise TokenUnavailable(f"cannot reach provider {client.name}: {exc}", 30) from None

    async def _poll(self, client: ProviderClient, grant: str, login_id: str) -> None:
        """Poll until the provider answers for good, then end the login either way."""
        polled = self._polls[grant]
        device = polled.device

        def noticed(waiting: Waiting) -> None:
            log.info(
                "device_login_waiting",
                grant=grant,
                login=login_id,
                interval=waiting.interval,
                note=waiting.note,
            )

        try:
            outcome = await wait_for_approval(
                lambda interval: client.poll_device(device.device_code, interval),
                interval=device.interval,
                expires_at=polled.expires_at,
                clock=self._clock,
                noticed=noticed,
            )
            if isinstance(outcome, Granted):
                await self._conclude(grant, login_id, outcome.tokens)
            elif await self._logins.fail_unfinished(login_id, outcome.reason, self._clock()):
                log.warning("login_failed", grant=grant, login=login_id, reason=outcome.reason)
        except Exception:  # the task must not die silently with its login left pending
            log.exception("login_error", grant=grant, login=login_id)
            reason = "the broker could not finish it; see its log"
            with contextlib.suppress(Exception):
                await self._logins.fail_unfinished(login_id, reason, self._clock())
        finally:
            if self._polls.get(grant) is polled:
                del self._polls[grant]

    async def _conclude(self, grant: str, login_id: str, tokens: TokenResponse) -> None:
        now = self._clock()
        try:
            pending = await self._logins.claim_device(login_id, now)
        except LoginError as exc:
            log.warning("login_failed", grant=grant, login=login_id, reason=str(exc))
            provider = grant.split("/", 1)[0]
            await self._finisher.discard(provider, tokens, grant)
            return

        async def granted(issued: list[TokenResponse]) -> LoginResult:
            issued.append(tokens)
            return await self._finisher.result(pending, tokens, now)

        await self._finisher.conclude(pending, granted, now)

    async def stop(self) -> None:
        """Stop polling; device logins still pending end as failed, saying why."""
        polled = list(self._polls.values())
        await self._tasks.cancel_all()
        # After the tasks: a task cancelled before it first ran has no handler of its own.
        for poll in polled:
            try:
                ended = await self._logins.fail_unfinished(poll.login_id, STOPPED, self._clock())
            except Exception as exc:  # noqa: BLE001 - a store that is down must not stop a stop
                log.warning(
                    "login_not_ended",
                    grant=poll.grant,
                    login=poll.login_id,
                    error=type(exc).__name__,
                )
                continue
            if ended:
                log.warning("login_failed", grant=poll.grant, login=poll.login_id, reason=STOPPED)


def _device_started(
    login_id: str, device: DeviceAuthorization, expires_at: datetime
) -> DeviceLoginStarted:
    return DeviceLoginStarted(
        login_id=login_id,
        verification_uri=device.verification_uri,
        verification_uri_complete=device.verification_uri_complete,
        user_code=device.user_code,
        expires_at=expires_at,
    )
