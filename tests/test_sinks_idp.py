"""Acceptance tests of sink files against the real django-oauth-toolkit IdP (tests/idp).

Real `token-broker serve` processes (tests/rotation_harness.py) keep short-lived access tokens
fresh at the IdP and write `[[sinks]]` files under the test's directory; the tests read the
files as a consumer would and check every content at the IdP's userinfo endpoint. The files
live outside `log_dir`, and every token read from them joins the session's leak scan.

The crash test holds the broker's SQLite write lock from a connection of its own (BEGIN
IMMEDIATE) while the IdP's answer arrives, so the broker's commit waits on its busy timeout;
it then SIGKILLs the broker in that window, between the IdP's answer and the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import pwd
import sqlite3
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.crypto import load_keyring
from broker.store.engine import create_engine
from broker.store.repository import GrantRepository
from broker.tasks import Tasks
from tests.idp import fixture as idp_fixture
from tests.idp.fixture import DjangoIdP, DjangoIdPFactory
from tests.rotation_harness import (
    PROVIDER,
    REGISTERED_REDIRECT,
    BrokerProcess,
    Installation,
    RefreshSettings,
    UserInfo,
    installation,
    log_events,
    remember_secret,
    report,
)

django_idp_factory = idp_fixture.django_idp_factory

pytestmark = pytest.mark.slow

ALICE = {"alice": "alice-password"}
FAST = RefreshSettings(lifetime_fraction=0.5, min_margin="1s", jitter=0.1, max_concurrency=8)
WAIT = 30.0  # seconds for anything the broker does on its own schedule
ROTATIONS = 3
NOBODY = pwd.getpwnam("nobody")


def sinks_toml(*tables: dict[str, Any]) -> str:
    """[[sinks]] tables for a broker config."""
    text = ""
    for table in tables:
        text += "\n[[sinks]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    return text


def add_sinks(broker: BrokerProcess, *tables: dict[str, Any]) -> None:
    """Append sinks to the broker's config (its last table is the provider's)."""
    broker.home.config.write_text(broker.home.config.read_text() + sinks_toml(*tables))


def read(path: Path) -> str | None:
    """A sink file's content as a consumer reads it, or None when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    remember_secret(text.strip().removeprefix("Authorization: Bearer "))
    return text


async def until(
    check: Callable[[], Awaitable[bool] | bool], what: str, within: float = WAIT
) -> None:
    """Poll `check` until it holds, at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)


async def served(broker: BrokerProcess, user: str = "alice") -> str | None:
    """The access token the broker serves now, or None."""
    reply = await broker.token(user)
    return str(reply.json()["access_token"]) if reply.status == 200 else None


async def steady(broker: BrokerProcess, path: Path) -> str:
    """The sink's token at a moment when it equals what the broker serves (no rotation between
    reading the file and asking the broker)."""
    found: list[str] = []

    async def agree() -> bool:
        before = read(path)
        token = await served(broker)
        if before is not None and before == token and read(path) == before:
            found.append(before)
            return True
        return False

    await until(agree, f"{path.name} holds the token the broker serves")
    return found[0]


async def stored_grant(inst: Installation, user: str = "alice") -> Any:
    """The grant as the store holds it now (the test's inspection, opened with the keyring)."""
    engine = create_engine(f"sqlite:///{inst.db}")
    try:
        return await GrantRepository(engine, load_keyring(inst.key_file)).get(PROVIDER, user)
    finally:
        await engine.dispose()


async def revoke_at_idp(idp: DjangoIdP, refresh_token: str) -> int:
    """Revoke a refresh token at the IdP's RFC 7009 endpoint, as its owner could."""
    form = {"token": refresh_token, "token_type_hint": "refresh_token", "client_id": idp.client_id}
    async with (
        aiohttp.ClientSession() as session,
        session.post(idp.revocation_endpoint, data=form) as response,
    ):
        return response.status


async def accepted(userinfo: UserInfo, token: str, path: Path) -> bool:
    """Whether the IdP's userinfo accepts `token`; a refusal is allowed only when the sink has
    moved on meanwhile (the IdP deletes an access token when it rotates the pair)."""
    if await userinfo.status(token) == 200:
        return True
    assert read(path) != token, "the IdP refuses the token the sink still holds"
    return False


def in_step(token_file: Path, json_file: Path, header_file: Path) -> bool:
    """Whether the three formats hold the same token."""
    token, body, header = read(token_file), read(json_file), read(header_file)
    if token is None or body is None or header is None:
        return False
    return (
        json.loads(body)["access_token"] == token and header == f"Authorization: Bearer {token}\n"
    )


def mode_and_owner(path: Path) -> tuple[int, int, int]:
    """(permission bits, uid, gid) of a file."""
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


async def test_sink_files_follow_every_rotation_on_every_node_and_go_when_a_login_is_needed(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """Two brokers on one store each write their own sinks: at start with the configured mode,
    owner and content; after every rotation at the IdP with a token its userinfo accepts; and
    the files go when the IdP refuses the refresh token and the grant needs a login."""
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=6, users=ALICE
    )
    userinfo = UserInfo(idp)
    here, there = tmp_path / "node-a", tmp_path / "node-b"
    here.mkdir()
    there.mkdir()
    token_file, json_file, header_file = here / "alice.token", here / "alice.json", here / "hdr"
    other_node = there / "alice.token"
    group = grp.getgrgid(NOBODY.pw_gid)
    numbers: dict[str, Any] = {}
    async with installation(idp, log_dir) as inst:
        a = inst.broker("a", refresh=FAST)
        b = inst.broker("b", refresh=FAST, callback=False, redirect_port=a.callback_port)
        add_sinks(
            a,
            {"grant": "techniek/alice", "path": str(token_file), "mode": "0640",
             "owner": NOBODY.pw_name, "group": group.gr_name},
            {"grant": "techniek/alice", "path": str(json_file), "format": "json"},
            {"grant": "techniek/alice", "path": str(header_file), "format": "header"},
        )  # fmt: skip
        add_sinks(b, {"grant": "techniek/alice", "path": str(other_node)})
        a.start()
        b.start()
        await a.log_in("alice", ALICE["alice"])

        first = await steady(a, token_file)
        assert mode_and_owner(token_file) == (0o640, NOBODY.pw_uid, group.gr_gid)
        assert mode_and_owner(json_file)[0] == 0o600
        assert await accepted(userinfo, first, token_file)
        seen, checked = [first], 1
        while checked <= ROTATIONS:
            await until(lambda: read(token_file) not in (None, seen[-1]), "the next rotation")
            token = await steady(a, token_file)
            if token in seen:
                continue
            seen.append(token)
            checked += await accepted(userinfo, token, token_file)
            await until(lambda: in_step(token_file, json_file, header_file), "formats agree", 5)
            await until(lambda: read(other_node) == read(token_file), "the other node follows", 5)
        numbers["tokens_checked_at_userinfo"] = checked
        numbers["distinct_tokens_in_sink"] = len(seen)

        # Restarted with no files, each node writes its sinks before the first rotation.
        for broker in (a, b):
            assert broker.stop() == 0
        for path in (token_file, json_file, header_file, other_node):
            path.unlink()
        a.start()
        b.start()
        restarted = await steady(a, token_file)
        await accepted(userinfo, restarted, token_file)
        await until(lambda: read(other_node) is not None, "the other node writes at start", 5)
        assert mode_and_owner(token_file) == (0o640, NOBODY.pw_uid, group.gr_gid)

        # The IdP no longer accepts the refresh token: the next refresh is invalid_grant.
        for _attempt in range(5):
            grant = await stored_grant(inst)
            remember_secret(grant.tokens.refresh_token.reveal())
            assert await revoke_at_idp(idp, grant.tokens.refresh_token.reveal()) == 200
            with contextlib.suppress(AssertionError):
                await until(
                    lambda: all(read(p) is None for p in (token_file, json_file, header_file)),
                    "the sinks are removed",
                    10,
                )
                break
        assert all(read(p) is None for p in (token_file, json_file, header_file))
        await until(lambda: read(other_node) is None, "the other node's sink is removed")
        state = (await a.grants())["alice"]
        assert state["state"] == "reauth_required"
        metrics = await a.metrics()
    await userinfo.close()
    written = metrics[("token_broker_sink_writes_total", (("outcome", "written"),))]
    removed = metrics[("token_broker_sink_writes_total", (("outcome", "removed"),))]
    failed = metrics[("token_broker_sink_writes_total", (("outcome", "failed"),))]
    numbers |= {"written_after_restart": written, "removed": removed, "failed": failed}
    report("sinks_follow_rotations", numbers)
    assert removed == 3
    assert failed == 0
    events = a.events("sink_removed")
    assert {e["path"] for e in events} == {str(token_file), str(json_file), str(header_file)}


@contextlib.contextmanager
def sqlite_write_lock(db: Path) -> Iterator[sqlite3.Connection]:
    """Hold the database's write lock (BEGIN IMMEDIATE) from a connection of the test's own."""
    conn = sqlite3.connect(db, timeout=5.0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def test_a_sink_never_holds_a_token_the_broker_had_not_committed_when_killed(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """Killed after the IdP answered a refresh but before the commit landed, the broker left
    the sink holding the old token; the restarted broker recovers inside the IdP's grace (the
    IdP returns the same new pair) and only then writes the new token."""
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=3600, refresh_grace=30,
        users=ALICE,
    )  # fmt: skip
    userinfo = UserInfo(idp)
    sink = tmp_path / "alice.token"
    tasks = Tasks()
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("crash", refresh=FAST, refresh_grace="30s")
        add_sinks(broker, {"grant": "techniek/alice", "path": str(sink)})
        broker.start()
        await broker.log_in("alice", ALICE["alice"])
        old = await steady(broker, sink)

        idp.faults(token_delay=1.5, count=1)
        before = idp.stats()
        refresh = tasks.spawn(broker.refresh("alice"), "admin refresh")
        await until(lambda: idp.stats()["refresh_ok"] > before["refresh_ok"], "the IdP rotated")
        # The IdP has rotated and holds its answer back; the broker's intent is committed.
        with sqlite_write_lock(inst.db):
            lock_taken = time.monotonic()
            await until(
                lambda: any(
                    e["outcome"] == "success" for e in log_events(broker.process.log(), "refresh")
                ),
                "the broker has the IdP's answer",
                10,
            )
            answered = time.monotonic()
            await asyncio.sleep(0.3)  # the commit is now waiting for our lock
            assert read(sink) == old, "the sink holds a token that is not committed"
            killed_incarnation = broker.process
            broker.kill()
            killed = time.monotonic()
        with contextlib.suppress(Exception):
            await refresh
        assert read(sink) == old
        written = log_events(killed_incarnation.log(), "sink_written")
        assert [e["generation"] for e in written] == [1]
        assert log_events(killed_incarnation.log(), "refresh")[-1]["outcome"] == "success"

        broker.start()
        await until(lambda: read(sink) not in (None, old), "the recovered token reaches the sink")
        new = await steady(broker, sink)
        after = idp.stats()
        assert new != old
        assert await userinfo.status(new) == 200
        assert after["same_pair_returned"] > before["same_pair_returned"]
        recovered = [e for e in broker.events("refresh") if e.get("outcome") == "success"]
        assert broker.events("refresh_outcome_unknown"), "the kill did not land mid-refresh"
    await userinfo.close()
    report(
        "sink_crash_window",
        {
            "answer_after_lock_s": round(answered - lock_taken, 3),
            "killed_after_answer_s": round(killed - answered, 3),
            "same_pair_returned": after["same_pair_returned"] - before["same_pair_returned"],
            "successful_refresh_events": len(recovered),
        },
    )


@contextlib.contextmanager
def read_only_mount(directory: Path) -> Iterator[Callable[[], None]]:
    """A read-only tmpfs on `directory` (root with CAP_SYS_ADMIN only); yields the function
    that makes it writable; unmounted at the end."""
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")

    def make_writable() -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(directory)], check=True)

    try:
        yield make_writable
    finally:
        subprocess.run(["umount", str(directory)], check=False)


async def test_a_read_only_directory_is_reported_and_never_stops_rotation(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """A sink in a read-only directory fails: logged with the path and the reason, counted,
    retried; rotations go on and their tokens are served; once the directory is writable the
    sink holds the current token."""
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=4, users=ALICE
    )
    userinfo = UserInfo(idp)
    directory = tmp_path / "ro"
    directory.mkdir()
    sink = directory / "alice.token"
    with read_only_mount(directory) as make_writable:
        async with installation(idp, log_dir) as inst:
            broker = inst.broker("ro", refresh=FAST)
            add_sinks(broker, {"grant": "techniek/alice", "path": str(sink)})
            broker.start()
            await broker.log_in("alice", ALICE["alice"])
            first = await served(broker)
            await until(
                lambda: (
                    len([e for e in broker.events("refresh") if e["outcome"] == "success"]) >= 2
                ),
                "two rotations",
            )
            current = await served(broker)
            assert current is not None
            assert current != first
            # Rotations go on: the served token works (unless it rotated again meanwhile).
            assert await userinfo.status(current) == 200 or await served(broker) != current
            failures = broker.events("sink_write_failed")
            assert failures, "no failed write was logged"
            assert {e["path"] for e in failures} == {str(sink)}
            assert {e["reason"] for e in failures} == {"Read-only file system"}
            metrics = await broker.metrics()
            failed = metrics[("token_broker_sink_writes_total", (("outcome", "failed"),))]
            assert failed >= len(failures) >= 2
            make_writable()
            await steady(broker, sink)
            recovered = broker.events("sink_written")
    await userinfo.close()
    report(
        "sink_read_only",
        {"failed_writes": failed, "rotations": len(broker.events("refresh")),
         "written_after": len(recovered)},
    )  # fmt: skip


async def test_a_sink_goes_when_its_token_expires_with_no_refresh_in_sight(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """While the IdP is down, the file is removed when its token expires (the refresh backs
    off; the grant stays active); once the IdP is back, the refreshed token is written."""
    idp = django_idp_factory(
        redirect_uris=[REGISTERED_REDIRECT], access_token_lifetime=4, users=ALICE
    )
    sink = tmp_path / "alice.token"
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("expiry", refresh=FAST)
        add_sinks(broker, {"grant": "techniek/alice", "path": str(sink)})
        broker.start()
        await broker.log_in("alice", ALICE["alice"])
        token = await steady(broker, sink)
        idp.stop()
        await until(lambda: read(sink) != token, "the file is removed at expiry", 10)
        assert read(sink) is None
        # The removal is logged just after the file goes.
        await until(lambda: bool(broker.events("sink_removed")), "the removal is logged", 5)
        removal = broker.events("sink_removed")[-1]
        assert "expired" in removal["why"]
        assert (await broker.grants())["alice"]["state"] == "active"
        idp.restart()
        await until(lambda: read(sink) not in (None, token), "the refreshed token is written", 60)
        assert await served(broker) == read(sink)
