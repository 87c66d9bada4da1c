"""Who is calling, and what they may have.

On the Unix socket the kernel tells us the peer's uid and gid (SO_PEERCRED), which cannot be
forged by the caller. On the optional loopback TCP listener, a bearer token is hashed and
compared in constant time with each client's `token_sha256`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import hashlib
import hmac
import pwd
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from broker.config import ClientConfig

_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass(frozen=True, slots=True)
class Caller:
    """An identified caller: a name for logs, admin rights, and the grants it may fetch."""

    name: str
    admin: bool
    patterns: tuple[str, ...] = ()
    uid: int | None = None

    def may_fetch(self, provider: str, user: str) -> bool:
        """Whether this caller may have the token of PROVIDER/USER."""
        if self.admin:
            return True
        target = f"{provider}/{user}"
        return any(fnmatch.fnmatchcase(target, pattern) for pattern in self.patterns)


ANONYMOUS = Caller(name="anonymous", admin=False)


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def peer_credentials(sock: _HasSockopt) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


@dataclass(frozen=True, slots=True)
class _Rule:
    client: ClientConfig
    uids: frozenset[int]
    gid: int | None


class Policy:
    """Maps peers to callers using the config's `[[clients]]`; built once per config."""

    def __init__(self, clients: Sequence[ClientConfig], daemon_uid: int) -> None:
        self._daemon_uid = daemon_uid
        self._rules = [_rule(client) for client in clients]
        self._bearers = [
            (bytes.fromhex(c.token_sha256), c) for c in clients if c.token_sha256 is not None
        ]

    def unix_caller(self, uid: int, gid: int) -> Caller:
        """The caller behind a Unix-socket peer; root and the daemon's own uid are admin."""
        if uid in (0, self._daemon_uid):
            return Caller(name=f"uid:{uid}", admin=True, uid=uid)
        for rule in self._rules:
            if uid in rule.uids or (rule.gid is not None and rule.gid == gid):
                client = rule.client
                return Caller(name=client.name, admin=client.admin, patterns=client.grants, uid=uid)
        return Caller(name=f"uid:{uid}", admin=False, uid=uid)

    def bearer_caller(self, token: str) -> Caller | None:
        """The client whose token_sha256 matches `token`, or None."""
        digest = hashlib.sha256(token.encode()).digest()
        found: ClientConfig | None = None
        for expected, client in self._bearers:
            # Compare against every entry so timing says nothing about which one matched.
            if hmac.compare_digest(digest, expected) and found is None:
                found = client
        if found is None:
            return None
        return Caller(name=found.name, admin=found.admin, patterns=found.grants)


def _rule(client: ClientConfig) -> _Rule:
    uids: set[int] = set()
    if client.unix_uid is not None:
        uids.add(client.unix_uid)
    if client.unix_user is not None:
        with contextlib.suppress(KeyError):  # an unknown user matches nobody
            uids.add(pwd.getpwnam(client.unix_user).pw_uid)
    gid: int | None = None
    if client.unix_group is not None:
        try:
            group = grp.getgrnam(client.unix_group)
        except KeyError:
            group = None
        if group is not None:
            gid = group.gr_gid
            for member in group.gr_mem:
                try:
                    uids.add(pwd.getpwnam(member).pw_uid)
                except KeyError:
                    continue
    return _Rule(client=client, uids=frozenset(uids), gid=gid)
