"""`token-broker login` against a real `serve` subprocess and a real django-oauth-toolkit IdP.

The command runs as a subprocess (`python -m broker login ... --no-browser`); the test reads
the authorize URL from its first stdout line, signs in at the IdP's forms with it the way a
person on another machine would, and waits for the command to exit.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tests import inprocess
from tests.daemon import clean_env
from tests.idp.browser import login
from tests.idp.fixture import DjangoIdP
from tests.inprocess import Broker, serving_broker, techniek

shared_idp = inprocess.shared_idp

PROVIDER, USER = "techniek", "alice"
CLI_TIMEOUT = 30.0  # seconds for the command to print its URL, and to exit after the redirect


async def run_login(
    broker: Broker, *, approve: bool, extra: tuple[str, ...] = ()
) -> tuple[int, str, str, str]:
    """Run the login command, sign in at the URL it prints; (exit code, URL, stdout, stderr)."""
    command = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "login",
        PROVIDER,
        USER,
        "--no-browser",
        "-c",
        str(broker.config_path),
        "--poll-interval",
        "0.05",
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert command.stdout is not None
        first = await asyncio.wait_for(command.stdout.readline(), CLI_TIMEOUT)
        url = first.decode().rstrip("\n")
        result = await login(url, USER, "alice-password", approve=approve, follow=True)
        assert result.callback_status is not None
        out, err = await asyncio.wait_for(command.communicate(), CLI_TIMEOUT)
    finally:
        if command.returncode is None:
            command.kill()
            await command.wait()
    assert command.returncode is not None
    return command.returncode, url, first.decode() + out.decode(), err.decode()


async def test_cli_login_prints_the_url_alone_and_exits_0_once_signed_in(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """The first stdout line is the authorize URL and nothing else; after the redirect the
    command exits 0 and the grant is stored."""
    providers = {PROVIDER: techniek(shared_idp)}
    async with serving_broker(tmp_path, log_dir, providers, process=True) as broker:
        code, url, out, err = await run_login(broker, approve=True)
        assert code == 0, err
        assert url.startswith(shared_idp.authorize_endpoint + "?")
        assert out.splitlines() == [url]
        assert f"logged in: {PROVIDER}/{USER}" in err
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["state"]) == (shared_idp.subs[USER], "active")
        broker.assert_not_logged(await broker.access_token(PROVIDER, USER))


async def test_cli_login_exits_1_with_the_reason_on_stderr_when_consent_is_denied(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Cancel on the consent page: the command exits 1 and says access_denied on stderr."""
    providers = {PROVIDER: techniek(shared_idp)}
    async with serving_broker(tmp_path, log_dir, providers, process=True) as broker:
        code, url, out, err = await run_login(broker, approve=False)
        assert code == 1, err
        assert out.splitlines() == [url]
        assert "login failed" in err
        assert "access_denied" in err
        assert (await broker.grant(PROVIDER, USER)).status == 404


async def test_cli_login_with_json_prints_the_outcome_after_the_url(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """With --json the URL keeps its own first line, and the completed login follows as JSON."""
    providers = {PROVIDER: techniek(shared_idp)}
    async with serving_broker(tmp_path, log_dir, providers, process=True) as broker:
        code, url, out, err = await run_login(broker, approve=True, extra=("--json",))
        assert code == 0, err
        first, rest = out.split("\n", 1)
        assert first == url
        outcome = json.loads(rest)
        assert (outcome["state"], outcome["provider"], outcome["user"]) == (
            "complete",
            PROVIDER,
            USER,
        )
        assert outcome["login_id"]
