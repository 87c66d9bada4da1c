"""Who is calling, and what they may have.

On the Unix socket the kernel tells us who the peer is: its pid, uid and gid (SO_PEERCRED) and
its supplementary groups (SO_PEERGROUPS), as they were when it connected. The caller cannot
forge them. On the optional loopback TCP listener, a bearer token is hashed and compared in
constant time with each client's `token_sha256`.

`Peer` is read once per connection; the `Policy` is consulted on every request, so a config
reload (`Policy.replace`) governs connections that are already open.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import grp
import hashlib
import hmac
import os
import pwd
import re
import socket
import struct
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from broker.config import ClientConfig

# Linux >= 4.13; Python's socket module does not name it.
SO_PEERGROUPS: int = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_GID = struct.Struct("I")  # gid_t: a native 32-bit unsigned int on every Linux
_SOCKOPT_MAX = 1024  # the largest buffer Python's socket.getsockopt accepts: 256 groups
_MAX_GROUPS = 65_536  # NGROUPS_MAX on Linux


_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class GrantPatterns:
    """Glob patterns over PROVIDER/USER (fnmatch's, case-sensitive), sorted once by kind so a
    decision costs the same whatever the number of grants, with nothing kept per grant:
    "PROVIDER/*" is a set lookup of the target's first segment, a pattern with no glob is a
    set lookup of the target, and only the rest are matched as regular expressions. Decides
    exactly as `fnmatch.fnmatchcase` against each pattern would (tests/test_identity.py)."""

    providers: frozenset[str]  # from "PROVIDER/*" with a literal PROVIDER
    targets: frozenset[str]  # patterns without a glob
    others: tuple[re.Pattern[str], ...]

    @staticmethod
    @functools.lru_cache(maxsize=1024)  # a caller is made per request on the full route
    def of(patterns: tuple[str, ...]) -> GrantPatterns:
        """The patterns, sorted by kind."""
        providers: set[str] = set()
        targets: set[str] = set()
        others: list[re.Pattern[str]] = []
        for pattern in patterns:
            head, sep, rest = pattern.partition("/")
            if not _GLOB.search(pattern):
                targets.add(pattern)
            elif sep and rest == "*" and not _GLOB.search(head):
                # "*" matches anything, "/" included: the target starts with "HEAD/", which
                # (HEAD holding no "/") is to say its first segment is HEAD.
                providers.add(head)
            else:
                others.append(re.compile(fnmatch.translate(pattern)))
        return GrantPatterns(frozenset(providers), frozenset(targets), tuple(others))

    def allow(self, provider: str, user: str) -> bool:
        """Whether any pattern matches PROVIDER/USER."""
        if self.providers and provider.partition("/")[0] in self.providers:
            return True
        if not self.targets and not self.others:
            return False
        target = f"{provider}/{user}"
        return target in self.targets or any(p.match(target) for p in self.others)


@dataclass(frozen=True, slots=True)
class Caller:
    """An identified caller: a name for logs, admin rights, and the grants it may fetch."""

    name: str
    admin: bool
    patterns: tuple[str, ...] = ()
    uid: int | None = None
    _grants: GrantPatterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_grants", GrantPatterns.of(self.patterns))

    def may_fetch(self, provider: str, user: str) -> bool:
        """Whether this caller may have the token of PROVIDER/USER."""
        return self.admin or self._grants.allow(provider, user)


ANONYMOUS = Caller(name="anonymous", admin=False)


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a Unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # supplementary groups


class _Socket(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...

    def fileno(self) -> int: ...


def peer_credentials(sock: _Socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid, gid


def peer_groups(sock: _Socket) -> tuple[int, ...] | None:
    """The peer's supplementary groups (SO_PEERGROUPS); None where the kernel lacks it."""
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _SOCKOPT_MAX)
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT:
            return None
        if exc.errno != errno.ERANGE:
            raise
        # More than 256 groups (common for directory users): ask libc, which is not capped.
        data = _getsockopt_unbounded(sock.fileno(), SO_PEERGROUPS, 2 * _SOCKOPT_MAX)
    return tuple(gid for (gid,) in _GID.iter_unpack(data))


def database_groups(uid: int, gid: int) -> tuple[int, ...]:
    """The groups the group database gives the user of `uid`; none for a uid without a user."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return ()
    return tuple(os.getgrouplist(name, gid))


def read_peer(
    sock: _Socket, fallback: Callable[[int, int], Iterable[int]] = database_groups
) -> Peer:
    """The peer of a Unix socket; its groups from `fallback(uid, gid)` without SO_PEERGROUPS."""
    pid, uid, gid = peer_credentials(sock)
    groups = peer_groups(sock)
    if groups is None:
        groups = tuple(fallback(uid, gid))
    return Peer(pid=pid, uid=uid, gid=gid, groups=frozenset(groups))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _getsockopt_unbounded(fd: int, option: int, size: int) -> bytes:
    """getsockopt(SOL_SOCKET, option) into a buffer grown to what the kernel says it needs."""
    getsockopt = _libc().getsockopt
    limit = _MAX_GROUPS * _GID.size
    for _attempt in range(4):  # the answer is fixed at connect(), so one regrowth suffices
        buffer = ctypes.create_string_buffer(size)
        length = ctypes.c_uint32(size)
        if getsockopt(fd, socket.SOL_SOCKET, option, buffer, ctypes.byref(length)) == 0:
            return buffer.raw[: length.value]
        code = ctypes.get_errno()
        if code != errno.ERANGE or size >= limit:
            raise OSError(code, os.strerror(code))
        # On ERANGE Linux writes the size it needs into `length`.
        size = min(limit, max(length.value, 2 * size))
    raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))


@dataclass(frozen=True, slots=True)
class _Rule:
    client: ClientConfig
    uids: frozenset[int]
    gid: int | None

    def matches(self, uid: int, gid: int, groups: Collection[int]) -> bool:
        return uid in self.uids or (
            self.gid is not None and (self.gid == gid or self.gid in groups)
        )


@dataclass(frozen=True, slots=True)
class _Rules:
    unix: tuple[_Rule, ...]
    bearers: tuple[tuple[bytes, ClientConfig], ...]


class Policy:
    """Maps peers to callers using the config's `[[clients]]`; `replace` swaps them on reload.

    A peer matching several clients gets the union of their grant patterns, and is admin if
    any of them is. unix_group matches the peer's primary gid or any of its supplementary
    groups, as the kernel reported them for the connection.
    """

    def __init__(self, clients: Sequence[ClientConfig], daemon_uid: int) -> None:
        self._daemon_uid = daemon_uid
        self._rules = _compile(clients)
        # Moves on every replace: a decision remembered under an older generation is stale.
        self.generation = 0

    def replace(self, clients: Sequence[ClientConfig]) -> None:
        """Rebuild the rules from `clients` (names resolved again) and swap them in at once."""
        rules = _compile(clients)  # may block on the user database; done before the swap
        self._rules = rules
        self.generation += 1

    def unix_caller(self, uid: int, gid: int, groups: Collection[int] = ()) -> Caller:
        """The caller behind a Unix-socket peer; root and the daemon's own uid are admin."""
        if uid in (0, self._daemon_uid):
            return Caller(name=f"uid:{uid}", admin=True, uid=uid)
        matched = [r.client for r in self._rules.unix if r.matches(uid, gid, groups)]
        if not matched:
            return Caller(name=f"uid:{uid}", admin=False, uid=uid)
        return _union(matched, uid)

    def bearer_caller(self, token: str) -> Caller | None:
        """The client(s) whose token_sha256 matches `token`, or None."""
        digest = hashlib.sha256(token.encode()).digest()
        matched: list[ClientConfig] = []
        for expected, client in self._rules.bearers:
            # Compare against every entry so timing says nothing about which one matched.
            if hmac.compare_digest(digest, expected):
                matched.append(client)
        return _union(matched, None) if matched else None


def _union(clients: Sequence[ClientConfig], uid: int | None) -> Caller:
    return Caller(
        name="+".join(c.name for c in clients),
        admin=any(c.admin for c in clients),
        patterns=tuple(dict.fromkeys(p for c in clients for p in c.grants)),
        uid=uid,
    )


def _compile(clients: Sequence[ClientConfig]) -> _Rules:
    return _Rules(
        unix=tuple(_rule(c) for c in clients if _has_unix_identity(c)),
        bearers=tuple(
            (bytes.fromhex(c.token_sha256), c) for c in clients if c.token_sha256 is not None
        ),
    )


def _has_unix_identity(client: ClientConfig) -> bool:
    return (client.unix_uid, client.unix_user, client.unix_group) != (None, None, None)


def _rule(client: ClientConfig) -> _Rule:
    uids: set[int] = set()
    if client.unix_uid is not None:
        uids.add(client.unix_uid)
    if client.unix_user is not None:
        with contextlib.suppress(KeyError):  # an unknown user matches nobody (until a reload)
            uids.add(pwd.getpwnam(client.unix_user).pw_uid)
    gid: int | None = None
    if client.unix_group is not None:
        with contextlib.suppress(KeyError):  # likewise an unknown group
            gid = grp.getgrnam(client.unix_group).gr_gid
    return _Rule(client=client, uids=frozenset(uids), gid=gid)
