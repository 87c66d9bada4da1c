"""This broker as a node of a fleet: its identity, its heartbeat, who else is alive, and the
database server's clock.

A broker makes a random node id when it starts (hostname and pid repeat across containers, so
they never identify a node; ROTATION.md invariant 9) and registers it in the store's `nodes`
table. Every `HEARTBEAT` seconds it stamps its heartbeat with the database server's clock, and
in the same write moves the deadline of the leases it holds for refreshes in flight, so leases
can be short and still never lapse under a live node. A node whose heartbeat is older than
`store.node_timeout` is dead: the leases it holds are free, and the refreshes it left with an
unknown outcome are recovered by the others through the same path as after a crash on one host.
A node that finds, on its own machine (same kernel boot and pid namespace), the pid of another
node gone marks it stopped at once, without waiting for the timeout: a broker restarted after a
crash recovers its predecessor's refreshes inside the provider's grace.

On PostgreSQL each heartbeat also measures the server's clock, which `ServerTime` then
extrapolates with the monotonic clock: the broker's time is the server's, whatever its own
clock says, so all nodes agree on expiries, leases and schedules.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import structlog

import broker
from broker.errors import StoreError
from broker.metrics import Metrics
from broker.store.nodes import Member, NodeInfo, NodeRepository

HEARTBEAT = 2.0  # seconds between heartbeats
SURVEY_MOMENT = 0.1  # seconds
KNOWN_WAIT = 2 * HEARTBEAT + 1.0  # at most this long at start for the peers to learn of a node
PURGE_AFTER = timedelta(days=1)  # stopped or silent nodes are forgotten after this
log = structlog.get_logger("broker.fleet")


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return ""


def this_node() -> NodeInfo:
    """A new identity for this process: a random id, and where it runs."""
    return NodeInfo(
        id=secrets.token_hex(8),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        boot_id=_read("/proc/sys/kernel/random/boot_id"),
        pid_namespace=_pid_namespace(),
        version=broker.__version__,
    )


def dead_here(other: NodeInfo, me: NodeInfo) -> bool:
    """Whether `other` ran on this machine, in this pid namespace, and its process is gone.

    Only a node of the same kernel boot and pid namespace can be judged by its pid; any other
    (another host, another container, an unknown boot) waits for its heartbeat to go stale.
    """
    same_place = (
        other.hostname == me.hostname
        and other.boot_id == me.boot_id != ""
        and other.pid_namespace == me.pid_namespace != ""
    )
    if not same_place or other.id == me.id or other.pid == me.pid:
        return False
    try:
        os.kill(other.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another uid
    return False


class ServerTime:
    """The database server's clock, measured at each heartbeat and carried forward by the
    monotonic clock in between (the reference a SteadyClock follows in a fleet)."""

    def __init__(self, first: datetime, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._anchor, self._at = first, monotonic()

    def measured(self, server: datetime, sent: float, received: float) -> None:
        """A reading `server` taken between monotonic times `sent` and `received`."""
        self._anchor = server + timedelta(seconds=(received - sent) / 2)
        self._at = received

    def __call__(self) -> datetime:
        return self._anchor + timedelta(seconds=self._monotonic() - self._at)


class Fleet:
    """This node's membership: registration, heartbeat, peers, and local reaping."""

    def __init__(
        self,
        nodes: NodeRepository,
        me: NodeInfo,
        clock: Callable[[], datetime],
        *,
        lease: timedelta,
        server_time: ServerTime | None = None,
        metrics: Metrics | None = None,
        known_wait: float = KNOWN_WAIT,
    ) -> None:
        self.nodes = nodes
        self._known_wait = known_wait
        self.me = me
        self._clock = clock
        # The grants whose leases this node holds for calls in flight (set by the refresher).
        self.in_flight: Callable[[], list[str]] = list
        self._lease = lease
        self._server_time = server_time
        self._metrics = metrics
        self.peers: frozenset[str] = frozenset()
        self.last_beat: float | None = None  # monotonic time of the last heartbeat stored
        # Since when (monotonic) every heartbeat has reached the store, without a break.
        self.steady_since: float | None = None

    async def join(self) -> None:
        """Register this node (alive from now)."""
        await self.nodes.register(self.me, self._clock())
        self.last_beat = self.steady_since = time.monotonic()
        if self._metrics is not None:
            self._metrics.store_up.set(1)
        await self.survey()
        await self._until_known()
        log.info("node_joined", node=self.me.id, peers=len(self.peers))

    async def _until_known(self) -> None:
        """Wait until every live peer has looked at the nodes since this one registered.

        A peer announces its claims only to the nodes it knows of (broker.follower), and it
        learns of a new one at its next heartbeat: a node that served before then could serve
        a token that a peer is rotating without telling it. A peer's heartbeat later than this
        node's registration means its survey, which follows the heartbeat, has seen this node.
        """
        deadline = time.monotonic() + self._known_wait
        while self.peers and time.monotonic() < deadline:
            members = await self.nodes.members(self._clock())
            registered = next((m.heartbeat_at for m in members if m.info.id == self.me.id), None)
            unaware = registered is not None and any(
                m.alive and m.info.id in self.peers and m.heartbeat_at <= registered
                for m in members
            )
            # When none is left, their surveys run right after the heartbeats just seen: this
            # pause gives them that moment.
            await asyncio.sleep(SURVEY_MOMENT)
            if not unaware:
                return
        if self.peers and self._known_wait > 0:
            log.warning("node_not_yet_known_by_peers", node=self.me.id, peers=len(self.peers))

    async def run(self) -> None:
        """Heartbeat until cancelled; a store that cannot be reached is retried each beat."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self.beat()
            except StoreError as exc:
                log.warning("heartbeat_failed", reason=str(exc))
                self.steady_since = None
                if self._metrics is not None:
                    self._metrics.store_up.set(0)
            else:
                if self._metrics is not None:
                    self._metrics.store_up.set(1)

    async def beat(self) -> None:
        """One heartbeat: stamp it, renew the leases of calls in flight, look around."""
        if not await self.nodes.heartbeat(self.me.id, self._clock(), self.in_flight(), self._lease):
            # Another node found this one dead (a long stall, a partition): its leases were
            # freed and may have been taken; its refreshes in flight are fenced off by their
            # generation. Come back under the same id.
            log.error("node_found_dead_by_others", node=self.me.id)
            try:
                await self.nodes.revive(self.me.id, self._clock())
            except StoreError:  # forgotten altogether: register again
                await self.nodes.register(self.me, self._clock())
            return
        self.last_beat = time.monotonic()
        if self.steady_since is None:
            self.steady_since = self.last_beat
        if self._server_time is not None:
            # Timed around the read alone: the heartbeat's write may have queued behind
            # others, and half of that wait would be taken for the server's clock being ahead.
            sent = time.monotonic()
            server = await self.nodes.server_time()
            if server is not None:
                self._server_time.measured(server, sent, time.monotonic())
        await self.survey()

    async def survey(self) -> list[Member]:
        """Who is alive; nodes on this machine whose process is gone are marked stopped."""
        now = self._clock()
        members = await self.nodes.members(now)
        gone = [
            m.info.id for m in members if m.info.id != self.me.id and dead_here(m.info, self.me)
        ]
        if gone:
            await self.nodes.stop(gone, now)
            log.warning("nodes_found_dead_here", nodes=gone)
        peers = frozenset(
            m.info.id
            for m in members
            if m.alive and m.info.id != self.me.id and m.info.id not in gone
        )
        if peers != self.peers:
            log.info("fleet_changed", node=self.me.id, peers=len(peers))
        self.peers = peers
        if secrets.randbelow(100) == 0:  # now and then, forget nodes long gone
            await self.nodes.purge(now, PURGE_AFTER)
        return members

    def judging(self) -> bool:
        """Whether this node has reached the store without a break for a whole node_timeout:
        only then has it seen every live node's heartbeat, and may it take a lapsed lease or a
        silent node for dead."""
        if self.steady_since is None:
            return False
        return time.monotonic() - self.steady_since >= self.nodes.node_timeout.total_seconds()

    def problem(self, node_timeout: timedelta) -> str | None:
        """Why this node is not a healthy member of the fleet, or None."""
        if self.last_beat is None:
            return "this node has not registered with the store"
        silent = time.monotonic() - self.last_beat
        if silent > node_timeout.total_seconds():
            return (
                f"this node has not reached the store for {silent:.0f}s: the others will "
                "take over its refreshes"
            )
        return None

    async def leave(self) -> None:
        """Mark this node stopped (its idle leases free at once); best effort."""
        try:
            await self.nodes.stop([self.me.id], self._clock())
        except StoreError as exc:
            log.warning("node_leave_failed", reason=str(exc))
