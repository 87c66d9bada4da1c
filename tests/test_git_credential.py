"""A real git (the Debian package) fetching through `token-broker git-credential`.

A loopback HTTP server of the test serves a bare repository (git's dumb HTTP protocol: the
repository's files, after `git update-server-info`) and admits a request only with Basic
credentials whose username is the provider's git_username and whose password is the access
token the broker serves right now, which the real django-oauth-toolkit IdP's userinfo
endpoint must also accept. git is told to ask the broker through `credential.URL.helper`, in a
HOME of its own with no system config and no terminal prompts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.daemon import clean_env
from tests.idp import fixture as idp_fixture
from tests.idp.fixture import DjangoIdPFactory
from tests.rotation_harness import (
    REGISTERED_REDIRECT,
    BrokerProcess,
    RefreshSettings,
    UserInfo,
    installation,
    remember_secret,
    report,
)

django_idp_factory = idp_fixture.django_idp_factory

GIT = shutil.which("git")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GIT is None, reason="git is not installed (apt-get install git)"),
]

ALICE = {"alice": "alice-password"}
GIT_USERNAME = "broker-bot"
SETTINGS = RefreshSettings(lifetime_fraction=0.75, min_margin="60s", jitter=0.1)
GIT_TIMEOUT = 60.0


@dataclass
class Forge:
    """The test's git server: who asked, with what, and what it answered."""

    root: Path
    broker: BrokerProcess
    userinfo: UserInfo
    url: str = ""
    admitted: list[str] = field(default_factory=list)  # the tokens it let in, in order
    refused: list[tuple[str, str]] = field(default_factory=list)  # (username, why)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve a file of the repository to a caller with the broker's current token."""
        why = await self._refusal(request.headers.get("Authorization", ""))
        if why is not None:
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="forge"'})
        relative = request.match_info["path"]
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise web.HTTPNotFound
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def _refusal(self, authorization: str) -> str | None:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            self.refused.append(("", "no credentials"))
            return "no credentials"
        username, _, password = base64.b64decode(encoded).decode().partition(":")
        remember_secret(password)
        served = await self.broker.token("alice")
        current = served.json()["access_token"] if served.status == 200 else None
        why = None
        if username != GIT_USERNAME:
            why = "wrong username"
        elif password != current:
            why = "not the broker's current token"
        elif await self.userinfo.status(password) != 200:
            why = "the IdP refuses it"
        if why is None:
            if not self.admitted or self.admitted[-1] != password:
                self.admitted.append(password)
        else:
            self.refused.append((username, why))
        return why


@contextlib.asynccontextmanager
async def serving(forge: Forge) -> AsyncIterator[Forge]:
    """The forge on a free loopback port."""
    app = web.Application()
    app.router.add_get("/{path:.+}", forge.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    forge.url = f"http://{host}:{port}"
    try:
        yield forge
    finally:
        await runner.cleanup()


def git(home: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run git with a HOME of its own, no system config and no prompts."""
    assert GIT is not None
    env = clean_env(
        {
            "HOME": str(home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.org",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.org",
        }
    )
    env.pop("GIT_ASKPASS", None)
    env.pop("SSH_ASKPASS", None)
    return subprocess.run(
        [GIT, *args],
        cwd=cwd or home,
        env=env,
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT,
        check=False,
    )


async def git_async(
    home: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """git in a thread, so the forge on this event loop can answer it."""
    return await asyncio.to_thread(git, home, *args, cwd=cwd)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The output of a git run that must succeed."""
    assert done.returncode == 0, done.stderr
    return done.stdout


def commit_and_publish(home: Path, work: Path, bare: Path, text: str) -> str:
    """Commit `text` in the work tree, push it to the bare repository and refresh its info
    files for dumb HTTP; the new commit's id."""
    (work / "README").write_text(text)
    ok(git(home, "add", "README", cwd=work))
    ok(git(home, "commit", "-q", "-m", text, cwd=work))
    ok(git(home, "push", "-q", str(bare), "HEAD:refs/heads/main", cwd=work))
    ok(git(home, "update-server-info", cwd=bare))
    return ok(git(home, "rev-parse", "HEAD", cwd=work)).strip()


def helper(broker: BrokerProcess, grant: str = "techniek/alice") -> str:
    """The credential.helper value that asks this broker for `grant`."""
    return f"!{sys.executable} -m broker -c {broker.home.config} git-credential {grant}"


async def test_git_fetches_through_the_broker_before_and_after_a_rotation(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """git clones and later fetches from a server that wants the broker's current token as
    the password; after a rotation at the IdP it gets the new token from the broker (the old
    one is dead at the IdP), and the server saw the provider's git_username both times."""
    idp = django_idp_factory(redirect_uris=[REGISTERED_REDIRECT], users=ALICE)
    userinfo = UserInfo(idp)
    home, work, bare = tmp_path / "home", tmp_path / "work", tmp_path / "srv" / "repo.git"
    for directory in (home, work, bare):
        directory.mkdir(parents=True)
    ok(git(home, "init", "-q", "--bare", "-b", "main", cwd=bare))
    ok(git(home, "init", "-q", "-b", "main", cwd=work))
    first_commit = commit_and_publish(home, work, bare, "one")
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("git", refresh=SETTINGS)
        broker.home.config.write_text(
            broker.home.config.read_text() + f'git_username = "{GIT_USERNAME}"\n'
        )
        broker.start()
        await broker.log_in("alice", ALICE["alice"])
        forge = Forge(bare.parent.resolve(), broker, userinfo)
        async with serving(forge):
            scoped = f"credential.{forge.url}.helper={helper(broker)}"
            clone = tmp_path / "clone"
            done = await git_async(
                home, "-c", scoped, "clone", "-q", f"{forge.url}/repo.git", str(clone)
            )
            ok(done)
            assert ok(git(home, "rev-parse", "HEAD", cwd=clone)).strip() == first_commit
            before = list(forge.admitted)

            refreshed = await broker.refresh("alice")
            assert refreshed.status == 200
            assert refreshed.json()["generation"] == 2
            assert await userinfo.status(before[-1]) == 401, "the old token still works"

            second_commit = commit_and_publish(home, work, bare, "two")
            ok(await git_async(home, "-c", scoped, "fetch", "-q", "origin", cwd=clone))
            fetched = ok(git(home, "rev-parse", "origin/main", cwd=clone)).strip()
            after = list(forge.admitted)
    await userinfo.close()
    report(
        "git_credential",
        {
            "tokens_admitted": len(after),
            "refusals": [why for _user, why in forge.refused],
            "git": ok(git(home, "--version")).strip(),
        },
    )
    assert fetched == second_commit
    assert len(before) == 1
    assert len(after) == 2
    assert after[0] != after[1]
    # git first asks without credentials; those are the only refusals.
    assert {why for _user, why in forge.refused} == {"no credentials"}


async def test_git_falls_back_to_its_next_helper_when_the_broker_cannot_answer(
    tmp_path: Path, log_dir: Path, django_idp_factory: DjangoIdPFactory
) -> None:
    """For a grant the broker does not have, git-credential prints no password and fails,
    so git asks the next helper configured (whose wrong password the server refuses)."""
    idp = django_idp_factory(redirect_uris=[REGISTERED_REDIRECT], users=ALICE)
    userinfo = UserInfo(idp)
    home, bare = tmp_path / "home", tmp_path / "srv" / "repo.git"
    for directory in (home, bare):
        directory.mkdir(parents=True)
    ok(git(home, "init", "-q", "--bare", "-b", "main", cwd=bare))
    ok(git(home, "update-server-info", cwd=bare))
    async with installation(idp, log_dir) as inst:
        broker = inst.broker("git", refresh=SETTINGS)
        broker.start()
        await broker.log_in("alice", ALICE["alice"])
        forge = Forge(bare.parent.resolve(), broker, userinfo)
        async with serving(forge):
            fallback = "!f() { echo username=fallback; echo password=not-a-token; }; f"
            done = await git_async(
                home,
                "-c",
                f"credential.{forge.url}.helper={helper(broker, 'techniek/nobody')}",
                "-c",
                f"credential.{forge.url}.helper={fallback}",
                "ls-remote",
                f"{forge.url}/repo.git",
            )
    await userinfo.close()
    assert done.returncode != 0
    assert "no grant techniek/nobody" in done.stderr
    assert ("fallback", "wrong username") in forge.refused
    assert not forge.admitted
