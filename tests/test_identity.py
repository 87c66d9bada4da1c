"""Tests for broker.api.identity: peers as the kernel reports them, and the access policy.

Everything here runs as whatever user the suite runs as; peers with other uids and groups (real
processes and a real daemon) are in tests/test_peers.py.
"""

from __future__ import annotations

import errno
import fnmatch
import grp
import hashlib
import os
import pwd
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.api.identity import (
    SO_PEERGROUPS,
    Caller,
    GrantPatterns,
    Peer,
    Policy,
    database_groups,
    peer_groups,
    read_peer,
)
from broker.config import ClientConfig

UNKNOWN_UID = 54_321
UNKNOWN_GID = 54_321
DAEMON_UID = 999


def _client(name: str, **fields: Any) -> ClientConfig:
    values: dict[str, Any] = {
        "unix_user": None,
        "unix_uid": None,
        "unix_group": None,
        "token_sha256": None,
        "grants": (),
        "admin": False,
    }
    return ClientConfig(name=name, **(values | fields))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two connected Unix stream sockets of this process."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        yield left, right


class WithoutPeerGroups:
    """A socket on a kernel without SO_PEERGROUPS (Linux before 4.13): that option fails."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
        """Answer as the wrapped socket does, except ENOPROTOOPT for SO_PEERGROUPS."""
        if level == socket.SOL_SOCKET and optname == SO_PEERGROUPS:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return self._sock.getsockopt(level, optname, buflen)

    def fileno(self) -> int:
        """The wrapped socket's descriptor."""
        return self._sock.fileno()


# -- peers ----------------------------------------------------------------------------------------


def test_the_peer_of_a_socketpair_is_this_process(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """SO_PEERCRED and SO_PEERGROUPS give this process's pid, uid, gid and groups."""
    peer = read_peer(pair[0])
    assert peer == Peer(
        pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), groups=frozenset(os.getgroups())
    )


def test_without_so_peergroups_the_fallback_gives_the_groups(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Where the kernel lacks SO_PEERGROUPS, the groups come from the fallback for (uid, gid)."""
    asked: list[tuple[int, int]] = []

    def fallback(uid: int, gid: int) -> list[int]:
        asked.append((uid, gid))
        return [UNKNOWN_GID, UNKNOWN_GID + 1]

    sock = WithoutPeerGroups(pair[0])
    assert peer_groups(sock) is None
    peer = read_peer(sock, fallback)
    assert asked == [(os.getuid(), os.getgid())]
    assert peer.groups == {UNKNOWN_GID, UNKNOWN_GID + 1}
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())


def test_the_default_fallback_is_the_users_groups_in_the_group_database(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Without SO_PEERGROUPS, a peer's groups are its user's in the group database."""
    user = pwd.getpwuid(os.getuid())
    peer = read_peer(WithoutPeerGroups(pair[0]))
    assert peer.groups == set(os.getgrouplist(user.pw_name, os.getgid()))


def test_a_uid_without_a_user_has_no_groups_in_the_database() -> None:
    """The database fallback gives no groups to a uid that names no user."""
    assert database_groups(UNKNOWN_UID, UNKNOWN_GID) == ()


def test_a_failing_getsockopt_is_not_taken_for_a_missing_option() -> None:
    """Errors other than ENOPROTOOPT (here: a closed socket) propagate; no groups are guessed."""
    left, right = socket.socketpair()
    right.close()
    left.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        peer_groups(left)


# -- the policy -----------------------------------------------------------------------------------


def test_root_and_the_daemons_own_uid_are_admin() -> None:
    """uid 0 and the daemon's uid are admin whatever the clients say."""
    policy = Policy(
        [_client("billing", unix_uid=1000, grants=("techniek/*",))], daemon_uid=DAEMON_UID
    )
    for uid in (0, DAEMON_UID):
        caller = policy.unix_caller(uid, UNKNOWN_GID)
        assert caller.admin
        assert caller.may_fetch("netid", "anyone")


def test_a_uid_matching_a_client_gets_its_patterns_and_no_admin() -> None:
    """A peer whose uid is a client's unix_uid gets that client's grants, not admin."""
    policy = Policy(
        [_client("billing", unix_uid=1000, grants=("techniek/*",))], daemon_uid=DAEMON_UID
    )
    caller = policy.unix_caller(1000, UNKNOWN_GID)
    assert caller == Caller(name="billing", admin=False, patterns=("techniek/*",), uid=1000)
    assert caller.may_fetch("techniek", "alice")
    assert not caller.may_fetch("netid", "alice")


# Names and patterns over a small alphabet, so that globs, "/" and near misses meet often.
_NAME = st.text(alphabet="ab/", max_size=4)
_PATTERN = st.text(alphabet="ab/*?[]!", max_size=6)


@settings(max_examples=2000, deadline=None)
@given(patterns=st.lists(_PATTERN, max_size=4), provider=_NAME, user=_NAME)
def test_grant_patterns_decide_as_fnmatchcase_does(
    patterns: list[str], provider: str, user: str
) -> None:
    """Sorting patterns by kind (provider-wide, exact, the rest) changes no decision."""
    caller = Caller(name="c", admin=False, patterns=tuple(patterns))
    expected = any(fnmatch.fnmatchcase(f"{provider}/{user}", p) for p in patterns)
    assert caller.may_fetch(provider, user) is expected


def test_grant_patterns_are_sorted_by_kind() -> None:
    """Provider-wide and exact patterns are set lookups; only the rest are expressions."""
    grants = GrantPatterns.of(("techniek/*", "netid/alice", "t?chniek/b*", "a*/*", "*"))
    assert grants.providers == {"techniek"}
    assert grants.targets == {"netid/alice"}
    assert len(grants.others) == 3
    assert grants.allow("techniek", "anyone")
    assert grants.allow("netid", "alice")
    assert GrantPatterns.of(("techniek/*",)).allow("techniek", "a/b")
    assert not GrantPatterns.of(("techniek/*",)).allow("techniekx", "a")
    assert not GrantPatterns.of(("techniek/*",)).allow("tech", "niek/a")


def test_an_unknown_uid_gets_nothing() -> None:
    """A peer matching no client is neither admin nor allowed any grant."""
    policy = Policy([_client("billing", unix_uid=1000, grants=("*/*",))], daemon_uid=DAEMON_UID)
    caller = policy.unix_caller(UNKNOWN_UID, UNKNOWN_GID, [UNKNOWN_GID + 1])
    assert not caller.admin
    assert caller.patterns == ()
    assert caller.name == f"uid:{UNKNOWN_UID}"
    assert not caller.may_fetch("techniek", "alice")


def test_a_unix_user_is_resolved_to_its_uid() -> None:
    """unix_user matches the uid the passwd database gives that name; an unknown name, nobody."""
    user = next(p for p in pwd.getpwall() if p.pw_uid not in (0, DAEMON_UID))
    policy = Policy(
        [
            _client("ghost", unix_user="no-such-user-here", grants=("netid/*",)),
            _client("named", unix_user=user.pw_name, grants=("techniek/*",)),
        ],
        daemon_uid=DAEMON_UID,
    )
    assert policy.unix_caller(user.pw_uid, UNKNOWN_GID).name == "named"
    assert policy.unix_caller(UNKNOWN_UID, UNKNOWN_GID).name == f"uid:{UNKNOWN_UID}"


def test_a_unix_group_matches_the_peers_primary_gid() -> None:
    """unix_group matches a peer whose gid is that group's, whatever its uid."""
    group = next(g for g in grp.getgrall() if g.gr_gid != 0)
    policy = Policy(
        [_client("ops", unix_group=group.gr_name, grants=("netid/*",))], daemon_uid=DAEMON_UID
    )
    caller = policy.unix_caller(UNKNOWN_UID, group.gr_gid)
    assert caller.name == "ops"
    assert caller.may_fetch("netid", "bob")
    assert not caller.may_fetch("techniek", "bob")
    assert policy.unix_caller(UNKNOWN_UID, UNKNOWN_GID).name != "ops"


def test_a_unix_group_matches_a_supplementary_group_of_the_peer() -> None:
    """unix_group matches a peer that holds the group as a supplementary group."""
    group = next(g for g in grp.getgrall() if g.gr_gid != 0)
    policy = Policy(
        [_client("ops", unix_group=group.gr_name, grants=("netid/*",))], daemon_uid=DAEMON_UID
    )
    assert policy.unix_caller(UNKNOWN_UID, UNKNOWN_GID, {7, group.gr_gid}).name == "ops"
    assert policy.unix_caller(UNKNOWN_UID, UNKNOWN_GID, {7}).name == f"uid:{UNKNOWN_UID}"


def test_group_membership_is_the_peers_not_the_group_databases() -> None:
    """A user listed as a group's member is not matched by that group unless the peer holds it."""
    member = next(
        (
            (g, pwd.getpwnam(m))
            for g in grp.getgrall()
            for m in g.gr_mem
            if g.gr_gid != 0 and _user_exists(m)
        ),
        None,
    )
    if member is None:
        pytest.skip("no group with a listed member on this machine (tests/test_peers.py makes one)")
    group, user = member
    policy = Policy(
        [_client("ops", unix_group=group.gr_name, grants=("netid/*",))], daemon_uid=DAEMON_UID
    )
    assert policy.unix_caller(user.pw_uid, UNKNOWN_GID, ()).name == f"uid:{user.pw_uid}"
    assert policy.unix_caller(user.pw_uid, UNKNOWN_GID, {group.gr_gid}).name == "ops"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_a_clients_admin_flag_is_honoured() -> None:
    """A client with admin = true is admin and may fetch any grant."""
    policy = Policy([_client("ops", unix_uid=1000, admin=True)], daemon_uid=DAEMON_UID)
    caller = policy.unix_caller(1000, UNKNOWN_GID)
    assert caller.admin
    assert caller.may_fetch("netid", "anyone")


def test_a_peer_matching_several_clients_gets_the_union_of_their_grants() -> None:
    """Several matching entries: every pattern of each, admin if any is, all names in the name."""
    policy = Policy(
        [
            _client("billing", unix_uid=1000, grants=("techniek/*",)),
            _client("reports", unix_group="no-such-group-here", grants=("netid/x",)),
            _client("ops", unix_uid=1000, grants=("netid/*", "techniek/*")),
            _client("other", unix_uid=1001, grants=("*/*",)),
        ],
        daemon_uid=DAEMON_UID,
    )
    caller = policy.unix_caller(1000, UNKNOWN_GID)
    assert caller == Caller(
        name="billing+ops", admin=False, patterns=("techniek/*", "netid/*"), uid=1000
    )
    assert caller.may_fetch("netid", "bob")
    assert caller.may_fetch("techniek", "alice")


def test_a_peer_is_admin_when_any_matching_client_is() -> None:
    """One admin entry among the matching ones makes the peer admin."""
    group = next(g for g in grp.getgrall() if g.gr_gid != 0)
    policy = Policy(
        [
            _client("billing", unix_uid=1000, grants=("techniek/*",)),
            _client("ops", unix_group=group.gr_name, admin=True),
        ],
        daemon_uid=DAEMON_UID,
    )
    assert not policy.unix_caller(1000, UNKNOWN_GID).admin
    assert policy.unix_caller(1000, UNKNOWN_GID, {group.gr_gid}).admin


def test_bearer_tokens_are_matched_by_sha256(new_secret: Callable[[str], str]) -> None:
    """The client whose token_sha256 is the token's sha256 is the caller; other tokens, none."""
    token = new_secret("bearer")
    digest = hashlib.sha256(token.encode()).hexdigest()
    policy = Policy(
        [
            _client("other", token_sha256=hashlib.sha256(b"x").hexdigest()),
            _client("billing", token_sha256=digest, grants=("techniek/*",)),
        ],
        daemon_uid=DAEMON_UID,
    )
    caller = policy.bearer_caller(token)
    assert caller == Caller(name="billing", admin=False, patterns=("techniek/*",))
    assert policy.bearer_caller(new_secret("bearer")) is None
    assert policy.bearer_caller("") is None


def test_a_bearer_only_client_matches_no_unix_peer(new_secret: Callable[[str], str]) -> None:
    """A client with only token_sha256 is never chosen for a Unix-socket peer."""
    digest = hashlib.sha256(new_secret("bearer").encode()).hexdigest()
    policy = Policy([_client("tcp-only", token_sha256=digest, admin=True)], daemon_uid=DAEMON_UID)
    assert not policy.unix_caller(UNKNOWN_UID, UNKNOWN_GID).admin


def test_replace_swaps_unix_and_bearer_rules(new_secret: Callable[[str], str]) -> None:
    """After replace, lookups follow the new clients only, for peers and bearer tokens alike."""
    old_token, new_token = new_secret("bearer"), new_secret("bearer")
    policy = Policy(
        [
            _client("billing", unix_uid=1000, grants=("techniek/*",)),
            _client("tcp", token_sha256=hashlib.sha256(old_token.encode()).hexdigest()),
        ],
        daemon_uid=DAEMON_UID,
    )
    policy.replace(
        [
            _client("reports", unix_uid=1001, grants=("netid/*",)),
            _client("tcp2", token_sha256=hashlib.sha256(new_token.encode()).hexdigest()),
        ]
    )
    assert policy.unix_caller(1000, UNKNOWN_GID).name == "uid:1000"
    assert policy.unix_caller(1001, UNKNOWN_GID).patterns == ("netid/*",)
    assert policy.bearer_caller(old_token) is None
    found = policy.bearer_caller(new_token)
    assert found is not None
    assert found.name == "tcp2"
    assert policy.unix_caller(DAEMON_UID, UNKNOWN_GID).admin


def test_replace_resolves_user_and_group_names_again() -> None:
    """replace looks names up anew: a name now naming another user or group follows it."""
    users = [p for p in pwd.getpwall() if p.pw_uid not in (0, DAEMON_UID)][:2]
    groups = [g for g in grp.getgrall() if g.gr_gid != 0][:2]
    if len(users) < 2 or len(groups) < 2:
        pytest.skip("needs two users and two groups besides root")
    policy = Policy(
        [
            _client("u", unix_user=users[0].pw_name, grants=("techniek/*",)),
            _client("g", unix_group=groups[0].gr_name, grants=("netid/*",)),
        ],
        daemon_uid=DAEMON_UID,
    )
    policy.replace(
        [
            _client("u", unix_user=users[1].pw_name, grants=("techniek/*",)),
            _client("g", unix_group=groups[1].gr_name, grants=("netid/*",)),
        ]
    )
    assert policy.unix_caller(users[1].pw_uid, UNKNOWN_GID).name == "u"
    assert policy.unix_caller(users[0].pw_uid, UNKNOWN_GID).name == f"uid:{users[0].pw_uid}"
    assert policy.unix_caller(UNKNOWN_UID, groups[1].gr_gid).name == "g"
    assert policy.unix_caller(UNKNOWN_UID, groups[0].gr_gid).name == f"uid:{UNKNOWN_UID}"


@pytest.mark.parametrize(
    ("pattern", "grant", "allowed"),
    [
        ("techniek/alice", "techniek/alice", True),
        ("techniek/alice", "techniek/alice2", False),
        ("techniek/*", "techniek/alice", True),
        ("techniek/*", "netid/alice", False),
        ("techniek/*", "techniek2/alice", False),
        ("*/alice", "netid/alice", True),
        ("*/alice", "netid/bob", False),
        ("techniek/svc-?", "techniek/svc-1", True),
        ("techniek/svc-?", "techniek/svc-12", False),
        ("techniek/[ab]*", "techniek/bob", True),
        ("techniek/[ab]*", "techniek/carol", False),
        ("techniek/*", "Techniek/alice", False),
        ("techniek/Alice", "techniek/alice", False),
    ],
)
def test_may_fetch_matches_globs_over_provider_and_user(
    pattern: str, grant: str, allowed: bool
) -> None:
    """may_fetch is a case-sensitive glob over PROVIDER/USER."""
    provider, user = grant.split("/")
    caller = Caller(name="c", admin=False, patterns=(pattern,))
    assert caller.may_fetch(provider, user) is allowed
