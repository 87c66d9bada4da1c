"""The composition root: builds everything from the config and owns the daemon's lifecycle.

Start-up order matters: the keyring is loaded and checked against the store *before* any
migration runs, so a wrong key leaves the database untouched; listeners open only after the
store is migrated and the cache is loaded; READY=1 goes to systemd only once they listen.

SIGHUP re-reads the config file. A config with any problem is refused whole (the problems are
logged, the running config stays). A valid one swaps providers, clients ([[clients]]), sinks
([[sinks]]) and the required grants in one step of the event loop; refreshes already at an IdP
finish with the client they started with, and no listener or connection is touched. Settings
that shape the listeners, the store or the refresh schedule keep their old values until a
restart, and the log says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from broker.api.app import build_app, build_metrics_app
from broker.api.callback import build_callback_app
from broker.api.identity import Policy
from broker.api.server import start_runner
from broker.api.sockets import BACKLOG, bind_unix
from broker.cache import GrantCache
from broker.clock import SLEW, SteadyClock
from broker.config import Config, Listen, ProviderConfig, load_config
from broker.crypto import Keyring, keyring_path, load_keyring
from broker.errors import BrokerError, ConfigError, KeyringError, StartupError, StoreUnavailable
from broker.fleet import Fleet, ServerTime, this_node
from broker.follower import Follower
from broker.grants import GrantService
from broker.idp.client import ProviderClient, read_client_secret
from broker.idp.http import new_session
from broker.live import LiveMap
from broker.login import LoginService
from broker.metrics import Metrics
from broker.model import GrantState, Secret
from broker.refresher import LEASE, Refresher
from broker.schedule import RefreshPolicy
from broker.sinks import Sinks
from broker.store.engine import file_probe, listener_params, store_engine
from broker.store.feed import PgListener
from broker.store.logins import LoginRepository
from broker.store.migrate import upgrade
from broker.store.nodes import NodeRepository
from broker.store.repository import GrantRepository
from broker.store.sealing import file_stamp
from broker.systemd import Notifier, activated_sockets, keepalive
from broker.tasks import Tasks, wait_event

READY_CHECK_TIMEOUT = 2.0
STOP_REPORT_SECONDS = 5.0
DB_WAIT_BASE = 1.0  # seconds between attempts to reach the database at start, doubling
DB_WAIT_CAP = 30.0
API_FD_NAME = "api"  # FileDescriptorName= of the API socket in token-broker.socket
log = structlog.get_logger("broker.daemon")


def steady_clock() -> SteadyClock:
    """The one clock the daemon injects everywhere: the wall clock, followed without steps."""

    def stepped(offset: float) -> None:
        log.warning(
            "clock_step_detected",
            offset_s=round(offset, 3),
            detail="the wall clock jumped; the broker keeps its own time steady and follows the "
            f"wall clock at {SLEW * 1000:g} ms per second",
        )

    return SteadyClock(on_step=stepped)


@dataclass(frozen=True, slots=True)
class Store:
    """The repositories over one migrated store."""

    grants: GrantRepository
    logins: LoginRepository
    nodes: NodeRepository


@dataclass(frozen=True, slots=True)
class Runtime:
    """What a running daemon is made of; the live maps and the policy change on reload."""

    store: Store
    session: aiohttp.ClientSession
    providers: LiveMap[str, ProviderConfig]
    clients: LiveMap[str, ProviderClient]
    metrics: Metrics
    service: GrantService
    logins: LoginService
    refresher: Refresher
    policy: Policy
    sinks: Sinks


class Daemon:
    """One running broker: store, service, listeners."""

    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str],
        clock: Callable[[], datetime],
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.environ = environ
        self.clock = clock
        self.stopping = asyncio.Event()
        self.reload_wanted = asyncio.Event()
        self.notifier = Notifier(environ)
        self.required = config.readiness.required_grants
        self.freeze_loaded = False  # gc.freeze() after the first load (see _collector_paused)
        self.refresher: Refresher | None = None
        self._config_path = Path(config.source) if config_path is None else config_path
        self._key_path = keyring_path(config.store.key_file, environ)
        # The paths the callback listener serves (None: no listener configured); a reload
        # that needs others must wait for a restart.
        self._served_callbacks: set[str] | None = None

    def load_keys(self) -> Keyring:
        """The keyring from its file (or systemd credential)."""
        return load_keyring(self._key_path)

    async def readiness(
        self,
        repository: GrantRepository,
        refresher: Refresher | None = None,
        service: GrantService | None = None,
    ) -> list[str]:
        """Reasons the daemon is not ready; empty when it is."""
        problems: list[str] = []
        stalled = None if refresher is None else refresher.stalled()
        if stalled:
            problems.append(f"refresher: {stalled}")
        if refresher is not None and refresher.fleet is not None:
            absent = refresher.fleet.problem(self.config.store.node_timeout)
            if absent:
                problems.append(f"fleet: {absent}")
        try:
            await asyncio.wait_for(repository.ping(), READY_CHECK_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever the store raises makes us unready
            problems.append(f"store: {type(exc).__name__}: the database does not answer")
        try:
            repository.sealer.refresh()  # `keys rotate` may have written a new primary key
            if repository.keyring.primary not in self.load_keys().keys:
                problems.append("keys: the keyring file no longer holds the key in use")
        except KeyringError as exc:
            problems.append(f"keys: {exc}")
        try:
            # Grants sealed under a key this process lacks (rotated by `keys rotate` while it
            # reads a copied keyring) cannot be refreshed until it restarts.
            unopened = await asyncio.wait_for(repository.verify_keys(), READY_CHECK_TIMEOUT)
            problems.extend(f"keys: {p}; restart the daemon" for p in unopened)
        except Exception as exc:  # noqa: BLE001 - reported above as a store problem
            log.debug("key_check_failed", error=type(exc).__name__)
        if service is not None:
            problems.extend(service.unusable(self.required, self.clock()))
        return problems

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        """The checked, migrated store; disposed on exit. A database that cannot be reached
        yet is waited for (with back-off, and a log line saying so), not a crash loop."""
        keyring = self.load_keys()
        engine = store_engine(self.config.store)
        try:
            repository = GrantRepository(
                engine,
                keyring,
                reload_keyring=self.load_keys,
                keyring_stamp=lambda: file_stamp(self._key_path),
                node_timeout=self.config.store.node_timeout,
            )
            await self._wait_for_database(repository)
            problems = await repository.verify_keys()
            if problems:
                raise KeyringError(
                    f"the keyring {self._key_path} does not open the store; nothing was changed. "
                    + "; ".join(problems)
                )
            before, after = await upgrade(engine)
            if before != after:
                log.info("store_migrated", before=before, after=after)
            yield Store(
                grants=repository,
                logins=LoginRepository(engine, repository.sealer),
                nodes=NodeRepository(engine, self.config.store.node_timeout),
            )
        finally:
            await engine.dispose()

    async def _wait_for_database(self, repository: GrantRepository) -> None:
        attempt = 0
        while True:
            try:
                await repository.ping()
            except StoreUnavailable as exc:
                attempt += 1
                delay = min(DB_WAIT_CAP, DB_WAIT_BASE * (1 << min(attempt - 1, 10)))
                log.warning(
                    "waiting_for_database",
                    attempt=attempt,
                    retry_in_s=delay,
                    reason=str(exc),
                    detail="the store cannot be reached yet; the daemon waits for it",
                )
                self.notifier.extend_timeout(delay + 10, "waiting for the database")
                if self.stopping.is_set():
                    raise StartupError("stopped while waiting for the database") from None
                await wait_event(self.stopping, delay)
                continue
            if attempt:
                log.info("database_reached", attempts=attempt + 1)
            return

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and stop; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        # Installed first: SIGHUP's default action would end a daemon still starting.
        handlers = {
            signal.SIGTERM: self.stopping.set,
            signal.SIGINT: self.stopping.set,
            signal.SIGHUP: self.reload_wanted.set,
        }
        for signum, handler in handlers.items():
            loop.add_signal_handler(signum, handler)
        watch = Tasks()
        watch.spawn(self._report_slow_stop(), "report a slow stop")
        try:
            await self._run()
        finally:
            for signum in handlers:
                loop.remove_signal_handler(signum)
            await watch.cancel_all()
        log.info("stopped")

    async def _report_slow_stop(self) -> None:
        """Once stopping has taken STOP_REPORT_SECONDS, say every so often what it waits for."""
        await self.stopping.wait()
        me = asyncio.current_task()
        while True:
            await asyncio.sleep(STOP_REPORT_SECONDS)
            waiting = sorted(
                _awaiting(task)
                for task in asyncio.all_tasks()
                if task is not me and not task.done()
            )
            log.warning("still_stopping", tasks=len(waiting), waiting_for=waiting[:20])

    async def _run(self) -> None:
        async with self.store() as store, contextlib.AsyncExitStack() as stack:
            rt = await self._build(store, stack)
            await self._listen(rt, stack)
            tasks = Tasks()
            stack.push_async_callback(tasks.cancel_all)
            self.notifier.ready(self._status(rt))
            tasks.spawn(self._keepalive(rt), "systemd-keepalive")
            while not self.stopping.is_set():
                await _first(tasks, self.stopping, self.reload_wanted)
                if self.reload_wanted.is_set() and not self.stopping.is_set():
                    self.reload_wanted.clear()
                    await self.reload(rt)
            log.info("stopping")
            self.notifier.stopping()

    async def _build(self, store: Store, stack: contextlib.AsyncExitStack) -> Runtime:
        session = await stack.enter_async_context(new_session())
        providers = LiveMap(self.config.providers)
        clients = LiveMap(_provider_clients(self.config.providers, session, {}))
        metrics = Metrics(self.config.providers)
        cache = GrantCache()
        refresh = self.config.refresh
        schedule = RefreshPolicy(
            lifetime_fraction=refresh.lifetime_fraction,
            min_margin=refresh.min_margin,
            jitter=refresh.jitter,
        )
        server_time = await self._follow_server_clock(store.nodes)
        fleet = Fleet(
            store.nodes,
            this_node(),
            self.clock,
            lease=LEASE,
            server_time=server_time,
            metrics=metrics,
        )
        listener = None
        if self.config.store.postgresql:
            listener = PgListener(*listener_params(self.config.store))
        follower = Follower(
            store.grants,
            cache,
            metrics,
            self.clock,
            listener=listener,
            shared=lambda: bool(fleet.peers),
            probe=file_probe(self.config.store.url),
        )
        refresher = Refresher(
            store.grants,
            cache=cache,
            clients=clients,
            providers=providers,
            policy=schedule,
            max_concurrency=refresh.max_concurrency,
            metrics=metrics,
            clock=self.clock,
            follower=follower,
            fleet=fleet,
        )
        fleet.in_flight = refresher.in_flight  # whose leases the heartbeat renews
        store.grants.judging = fleet.judging  # no time-based takeovers right after an outage
        await fleet.join()
        stack.push_async_callback(fleet.leave)
        background = Tasks()
        stack.push_async_callback(background.cancel_all)
        background.spawn(fleet.run(), "fleet heartbeat")
        if listener is not None:
            background.spawn(listener.run(), "store feed")
        service = GrantService(
            store.grants,
            providers,
            clients,
            cache=cache,
            refresher=refresher,
            policy=schedule,
            clock=self.clock,
        )
        logins = LoginService(
            store.logins, service, clients, clock=self.clock, redirect_served=self._redirects_to
        )
        with _collector_paused(freeze=self.freeze_loaded):
            await service.load()
        # Started before the refresher and stopped after it: a refresh still committing at
        # shutdown reaches the files too.
        sinks = Sinks(self.config.sinks, cache=cache, clock=self.clock, metrics=metrics)
        sinks.start()
        stack.push_async_callback(sinks.stop)
        metrics.watch_grants(lambda: service.gauges(self.clock()))
        self.refresher = refresher
        await refresher.recover()
        stack.push_async_callback(refresher.stop)
        refresher.start()
        stack.push_async_callback(logins.stop)  # device logins still polling end as failed
        policy = Policy(self.config.clients, os.getuid())
        return Runtime(
            store, session, providers, clients, metrics, service, logins, refresher, policy, sinks
        )

    async def _listen(self, rt: Runtime, stack: contextlib.AsyncExitStack) -> None:
        server = self.config.server
        app = build_app(
            service=rt.service,
            logins=rt.logins,
            metrics=rt.metrics,
            policy=rt.policy,
            clock=self.clock,
            readiness=lambda: self.readiness(rt.store.grants, rt.refresher, rt.service),
        )
        api_socket, activated = self._api_socket(stack)
        api = await start_runner(stack, app)
        if server.metrics is not None:
            metrics_runner = await start_runner(stack, build_metrics_app(rt.metrics))
            await _start_tcp(metrics_runner, server.metrics, "metrics")
        if server.callback is not None:
            self._served_callbacks = set()
        if server.callback is not None and self.config.providers:
            redirect_uris = [p.redirect_uri for p in self.config.providers.values()]
            callback_app = build_callback_app(rt.logins, self.clock, redirect_uris)
            await _start_tcp(await start_runner(stack, callback_app), server.callback, "callback")
            self._served_callbacks = _callback_paths(self.config)
        # The API last: a login asked for the moment the socket answers must find the callback
        # listener up, or it would pick the device grant as if no redirect could come.
        await web.SockSite(api, api_socket, backlog=BACKLOG).start()
        if server.tcp is not None:
            await _start_tcp(api, server.tcp, "tcp")
        log.info(
            "serving",
            socket=str(server.socket),
            socket_activated=activated,
            tcp=_text(server.tcp),
            metrics=_text(server.metrics),
            callback=_text(server.callback),
            grants=sum(rt.service.gauges(self.clock()).by_state.values()),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )

    def _api_socket(self, stack: contextlib.AsyncExitStack) -> tuple[socket.socket, bool]:
        """The API socket: passed in by systemd (socket activation), else bound here."""
        passed = activated_sockets(self.environ)
        if not passed:
            listener = bind_unix(self.config.server.socket, self.config.server.socket_mode)
            stack.callback(listener.remove)  # runs after the runner has drained
            return listener.sock, False
        sock = passed.pop(API_FD_NAME, None)
        if sock is None and len(passed) == 1:
            _name, sock = passed.popitem()
        for other in passed.values():
            other.close()
        if sock is None or sock.type != socket.SOCK_STREAM:
            raise StartupError(
                f"systemd passed sockets but none is a stream socket named {API_FD_NAME!r}; "
                f"set FileDescriptorName={API_FD_NAME} in the .socket unit"
            )
        sock.setblocking(False)
        stack.callback(sock.close)  # the socket file belongs to systemd: never unlinked here
        return sock, True

    def _redirects_to(self, provider: ProviderConfig) -> bool:
        """Whether the callback listener serves this provider's redirect_uri."""
        served = self._served_callbacks
        return served is not None and (urlsplit(provider.redirect_uri).path or "/") in served

    async def reload(self, rt: Runtime) -> bool:
        """Re-read the config file and apply it; False (nothing changed) when it is refused."""
        self.notifier.reloading()
        try:
            new = load_config(self._config_path)
            clients = _provider_clients(new.providers, rt.session, rt.clients)
        except BrokerError as exc:
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.error(
                "reload_refused",
                config=str(self._config_path),
                problems=problems,
                detail="the running config stays; fix the file and send SIGHUP again",
            )
            return False
        except Exception as exc:  # noqa: BLE001 - a defect in reading a config must not end us
            log.error(
                "reload_refused",
                config=str(self._config_path),
                problems=[f"unexpected {type(exc).__name__} while reading the config"],
                detail="the running config stays; please report this with the config's shape",
            )
            return False
        else:
            self._apply(rt, new, clients)
            return True
        finally:
            self.notifier.ready(self._status(rt))

    def _apply(self, rt: Runtime, new: Config, clients: dict[str, ProviderClient]) -> None:
        """Swap in `new`; no await in here, so the event loop sees old or new, never a mix."""
        old = self.config
        rt.clients.replace(clients)
        rt.providers.replace(new.providers)
        for name, provider in new.providers.items():
            if old.providers.get(name) != provider:
                rt.refresher.resume(name)  # a paused provider is tried again with the new config
        rt.metrics.add_providers(new.providers)
        rt.policy.replace(new.clients)
        rt.sinks.replace(new.sinks)
        self.required = new.readiness.required_grants
        restart = [
            name
            for name in ("server", "store", "refresh")
            if getattr(old, name) != getattr(new, name)
        ]
        served = self._served_callbacks
        if served is not None and not _callback_paths(new) <= served:
            restart.append("providers.*.redirect_uri (the callback listener's paths)")
        self.config = dataclasses.replace(
            new, server=old.server, store=old.store, refresh=old.refresh
        )
        log.info(
            "config_reloaded",
            config=str(self._config_path),
            providers_added=sorted(set(new.providers) - set(old.providers)),
            providers_removed=sorted(set(old.providers) - set(new.providers)),
            providers_changed=sorted(
                n
                for n in set(old.providers) & set(new.providers)
                if old.providers[n] != new.providers[n]
            ),
            clients=len(new.clients),
            sinks=len(new.sinks),
            required_grants=len(self.required),
        )
        if restart:
            log.warning(
                "reload_needs_restart",
                sections=restart,
                detail="these settings keep their old values until the daemon restarts",
            )

    async def _follow_server_clock(self, nodes: NodeRepository) -> ServerTime | None:
        """In a fleet (PostgreSQL), this broker's time is the database server's."""
        server = await nodes.server_time()
        if server is None:
            return None
        server_time = ServerTime(server)
        if isinstance(self.clock, SteadyClock):
            offset = self.clock.follow(server_time)
            log.info(
                "clock_follows_database",
                offset_s=round(offset, 3),
                detail="leases, intents, schedules and expiries use the database server's clock",
            )
        return server_time

    def _status(self, rt: Runtime) -> str:
        """The STATUS= line: how many grants, by state."""
        by_state = rt.service.gauges(self.clock()).by_state
        counts = dict.fromkeys(GrantState, 0)
        for (_provider, state), count in by_state.items():
            counts[GrantState(state)] += count
        total = sum(counts.values())
        return f"serving {total} grants: " + ", ".join(
            f"{count} {state.value}" for state, count in counts.items()
        )

    async def _keepalive(self, rt: Runtime) -> None:
        """Feed the watchdog while the refresh loop is healthy, and keep STATUS= current."""
        await keepalive(
            self.notifier,
            health=rt.refresher.stalled,
            status=lambda: self._status(rt),
        )


@contextlib.contextmanager
def _collector_paused(*, freeze: bool) -> Iterator[None]:
    """Load the store with Python's cycle collector paused; with `freeze`, then set everything
    alive aside from later collections.

    Loading 100,000 grants allocates millions of objects, each batch of which would otherwise
    set off a full collection that walks everything loaded so far. What the load leaves is
    long-lived and free of cycles (grants are dropped by reference count when replaced), so in
    the daemon's own process it is frozen out of later collections (`gc.freeze`), which keeps
    them cheap. Not where the daemon shares its process (the tests): what is alive there at
    that moment may later become cyclic garbage that would never be collected.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        if freeze:
            gc.freeze()


async def _first(tasks: Tasks, *events: asyncio.Event) -> None:
    """Wait until any of `events` is set."""
    waiters = [tasks.spawn(event.wait(), name="wait-event") for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _provider_clients(
    providers: Mapping[str, ProviderConfig],
    session: aiohttp.ClientSession,
    current: Mapping[str, ProviderClient],
) -> dict[str, ProviderClient]:
    """A client per provider; an unchanged provider keeps its client (and what it discovered)."""
    clients: dict[str, ProviderClient] = {}
    for name, provider in providers.items():
        secret = _client_secret(provider)
        existing = current.get(name)
        if existing is not None and existing.serves(provider, secret):
            clients[name] = existing
        else:
            clients[name] = ProviderClient(provider, session, secret)
    return clients


def _client_secret(provider: ProviderConfig) -> Secret | None:
    if provider.client_secret_file is None:
        return None
    return read_client_secret(provider.client_secret_file)


def _callback_paths(config: Config) -> set[str]:
    return {urlsplit(p.redirect_uri).path or "/" for p in config.providers.values()}


async def _start_tcp(runner: web.AppRunner, listen: Listen, key: str) -> None:
    try:
        await web.TCPSite(runner, listen.host, listen.port, backlog=BACKLOG).start()
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {listen} (server.{key}): {exc.strerror or exc}; "
            f"stop what uses it or change server.{key}"
        ) from None


def _text(listen: Listen | None) -> str | None:
    return None if listen is None else str(listen)


async def serve(
    config: Config, environ: Mapping[str, str] | None = None, config_path: Path | None = None
) -> None:
    """Run the daemon for `config` until it is told to stop."""
    daemon = Daemon(config, os.environ if environ is None else environ, steady_clock(), config_path)
    daemon.freeze_loaded = True  # this process is the daemon's alone
    await daemon.run()


def _awaiting(task: asyncio.Task[Any]) -> str:
    """A task's name and the innermost coroutines it is suspended in (names only)."""
    chain: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(chain) < 32:
        name = getattr(coro, "__qualname__", None)
        if name is None:
            break
        chain.append(name)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return f"{task.get_name()}: {' > '.join(chain[-3:])}"
