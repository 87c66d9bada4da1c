"""The composition root: builds everything from the config and owns the daemon's lifecycle.

Start-up order matters: the keyring is loaded and checked against the store *before* any
migration runs, so a wrong key leaves the database untouched; listeners open only after the
store is migrated and the cache is loaded; READY=1 goes to systemd only once they listen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from aiohttp import web

from broker.api.app import build_app, build_metrics_app
from broker.api.callback import build_callback_app
from broker.api.identity import Policy
from broker.api.server import start_runner
from broker.api.sockets import bind_unix
from broker.cache import GrantCache
from broker.config import Config, Listen, ProviderConfig
from broker.crypto import Keyring, keyring_path, load_keyring
from broker.errors import KeyringError
from broker.grants import GrantService
from broker.idp.client import ProviderClient, read_client_secret
from broker.idp.http import new_session
from broker.login import LoginService
from broker.metrics import Metrics
from broker.model import Secret
from broker.refresher import Refresher
from broker.schedule import RefreshPolicy
from broker.store.engine import create_engine
from broker.store.logins import LoginRepository
from broker.store.migrate import upgrade
from broker.store.repository import GrantRepository
from broker.systemd import notify

READY_CHECK_TIMEOUT = 2.0
log = structlog.get_logger("broker.daemon")


def utcnow() -> datetime:
    """The wall clock, in UTC; the one clock the daemon injects everywhere."""
    return datetime.now(UTC)


class Daemon:
    """One running broker: store, service, listeners."""

    def __init__(self, config: Config, environ: Mapping[str, str], clock: Callable[[], datetime]):
        self.config = config
        self.environ = environ
        self.clock = clock
        self.stopping = asyncio.Event()
        self._key_path = keyring_path(config.store.key_file, environ)

    def load_keys(self) -> Keyring:
        """The keyring from its file (or systemd credential)."""
        return load_keyring(self._key_path)

    async def readiness(
        self, repository: GrantRepository, refresher: Refresher | None = None
    ) -> list[str]:
        """Reasons the daemon is not ready; empty when it is."""
        problems: list[str] = []
        stalled = None if refresher is None else refresher.stalled(self.clock())
        if stalled:
            problems.append(f"refresher: {stalled}")
        try:
            await asyncio.wait_for(repository.ping(), READY_CHECK_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever the store raises makes us unready
            problems.append(f"store: {type(exc).__name__}: the database does not answer")
        try:
            if repository.keyring.primary not in self.load_keys().keys:
                problems.append("keys: the keyring file no longer holds the key in use")
        except KeyringError as exc:
            problems.append(f"keys: {exc}")
        return problems

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        """The checked, migrated store; disposed on exit."""
        keyring = self.load_keys()
        engine = create_engine(self.config.store.url)
        try:
            repository = GrantRepository(engine, keyring, reload_keyring=self.load_keys)
            problems = await repository.verify_keys()
            if problems:
                raise KeyringError(
                    f"the keyring {self._key_path} does not open the store; nothing was changed. "
                    + "; ".join(problems)
                )
            before, after = await upgrade(engine)
            if before != after:
                log.info("store_migrated", before=before, after=after)
            yield Store(grants=repository, logins=LoginRepository(engine, repository.sealer))
        finally:
            await engine.dispose()

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and stop."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        async with self.store() as store, contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(new_session())
            clients = {
                name: ProviderClient(provider, session, _client_secret(provider))
                for name, provider in self.config.providers.items()
            }
            metrics = Metrics(self.config.providers)
            cache = GrantCache()
            refresh = self.config.refresh
            policy = RefreshPolicy(
                lifetime_fraction=refresh.lifetime_fraction,
                min_margin=refresh.min_margin,
                jitter=refresh.jitter,
            )
            refresher = Refresher(
                store.grants,
                cache=cache,
                clients=clients,
                providers=self.config.providers,
                policy=policy,
                max_concurrency=refresh.max_concurrency,
                metrics=metrics,
                clock=self.clock,
            )
            service = GrantService(
                store.grants,
                self.config.providers,
                clients,
                cache=cache,
                refresher=refresher,
                policy=policy,
                clock=self.clock,
            )
            logins = LoginService(store.logins, service, clients)
            count = await service.load()
            metrics.watch_grants(lambda: service.gauges(self.clock()))
            self.refresher = refresher
            await refresher.recover()
            stack.push_async_callback(refresher.stop)
            refresher.start()
            app = build_app(
                service=service,
                logins=logins,
                metrics=metrics,
                policy=Policy(self.config.clients, os.getuid()),
                clock=self.clock,
                readiness=lambda: self.readiness(store.grants, refresher),
            )
            listener = bind_unix(self.config.server.socket, self.config.server.socket_mode)
            stack.callback(listener.remove)  # runs after the runner below has drained
            api = await start_runner(stack, app)
            await web.SockSite(api, listener.sock).start()
            if self.config.server.tcp is not None:
                await _tcp_site(api, self.config.server.tcp).start()
            if self.config.server.metrics is not None:
                metrics_runner = await start_runner(stack, build_metrics_app(metrics))
                await _tcp_site(metrics_runner, self.config.server.metrics).start()
            callback = self.config.server.callback
            if callback is not None and self.config.providers:
                redirect_uris = [p.redirect_uri for p in self.config.providers.values()]
                callback_app = build_callback_app(logins, self.clock, redirect_uris)
                await _tcp_site(await start_runner(stack, callback_app), callback).start()
            log.info(
                "serving",
                socket=str(self.config.server.socket),
                tcp=_text(self.config.server.tcp),
                metrics=_text(self.config.server.metrics),
                callback=_text(callback),
                grants=count,
            )
            notify("READY=1", self.environ)
            notify(f"STATUS=serving {count} grants", self.environ)
            await self.stopping.wait()
            log.info("stopping")
            notify("STOPPING=1", self.environ)
        log.info("stopped")


@dataclass(frozen=True, slots=True)
class Store:
    """The repositories over one migrated store."""

    grants: GrantRepository
    logins: LoginRepository


def _client_secret(provider: ProviderConfig) -> Secret | None:
    if provider.client_secret_file is None:
        return None
    return read_client_secret(provider.client_secret_file)


def _tcp_site(runner: web.AppRunner, listen: Listen) -> web.TCPSite:
    return web.TCPSite(runner, listen.host, listen.port)


def _text(listen: Listen | None) -> str | None:
    return None if listen is None else str(listen)


async def serve(config: Config, environ: Mapping[str, str] | None = None) -> None:
    """Run the daemon for `config` until it is told to stop."""
    daemon = Daemon(config, os.environ if environ is None else environ, utcnow)
    await daemon.run()
