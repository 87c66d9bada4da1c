"""`token-broker login --device` as a subprocess, against a broker and a real django-oauth-toolkit
IdP; the person enters the printed code on DOT's device page (`enter_user_code`).

The command's stdout is a pipe, except in the QR test, where it is a pseudo-terminal (`pty`),
as when a person runs it; the test reads the QR code it draws back into modules and compares
them with the QR code of the complete verification URI.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import os
import pty
import signal
import sys
from pathlib import Path

import segno

from tests import conftest, inprocess
from tests.daemon import clean_env
from tests.idp.browser import enter_user_code
from tests.idp.fixture import DjangoIdP
from tests.inprocess import Broker, serving_broker
from tests.test_login_device import PROVIDER, USER, device_provider, ended

shared_idp = inprocess.shared_idp

CLI_TIMEOUT = 30.0  # seconds for the command to print, and to exit once the login has ended
# Unicode half blocks as segno draws them, light modules in ink: (top dark, bottom dark).
HALF_BLOCKS = {" ": (1, 1), "\u2580": (0, 1), "\u2584": (1, 0), "\u2588": (0, 0)}


async def start_cli(
    broker: Broker, *extra: str, stdout: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """`python -m broker login techniek alice` with `extra` options."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "login",
        PROVIDER,
        USER,
        "-c",
        str(broker.config_path),
        "--poll-interval",
        "0.05",
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )


async def first_lines(command: asyncio.subprocess.Process, count: int) -> list[str]:
    """The first `count` lines the command writes to its stdout pipe."""
    assert command.stdout is not None
    lines = []
    for _ in range(count):
        line = await asyncio.wait_for(command.stdout.readline(), CLI_TIMEOUT)
        lines.append(line.decode().rstrip("\n"))
    return lines


async def finish(command: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """Wait for the command: (exit code, the rest of stdout, stderr)."""
    try:
        out, err = await asyncio.wait_for(command.communicate(), CLI_TIMEOUT)
    finally:
        if command.returncode is None:
            command.kill()
            await command.wait()
    assert command.returncode is not None
    return command.returncode, (out or b"").decode(), err.decode()


async def test_cli_device_login_prints_the_uri_and_the_code_alone_and_exits_0_once_approved(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """stdout is the verification URI, then the user code, each alone on its line, and no QR
    code (not a terminal); entering the code on DOT's page ends the command with 0."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        command = await start_cli(broker, "--device")
        uri, code = await first_lines(command, 2)
        conftest.SECRETS.add(code)
        assert uri == shared_idp.device_page
        assert code.isalnum()
        page = await enter_user_code(uri, USER, "alice-password", user_code=code)
        assert page.heading == "Device Authorized"
        status, rest, err = await finish(command)
        # What a person sees (-s shows it), the code masked.
        print(f"\n[device_login_cli] stdout:\n{uri}\n{'*' * len(code)}\nstderr:\n{err}", flush=True)
        assert status == 0, err
        assert rest == ""
        assert "open this page and enter the code" in err
        assert f"logged in: {PROVIDER}/{USER}" in err
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["sub"], grant["state"]) == (shared_idp.subs[USER], "active")


async def test_cli_device_login_exits_1_saying_the_person_denied_it(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Deny on DOT's page: exit 1, and stderr says the login failed because it was denied."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        command = await start_cli(broker, "--device")
        uri, code = await first_lines(command, 2)
        conftest.SECRETS.add(code)
        await enter_user_code(uri, USER, "alice-password", user_code=code, approve=False)
        status, _rest, err = await finish(command)
        assert status == 1, err
        assert "login failed: the person at the provider denied the login (access_denied)" in err
        assert (await broker.grant(PROVIDER, USER)).status == 404


async def test_cli_login_without_device_and_without_a_callback_uses_the_device_grant_and_json(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """No callback listener and no --device: the daemon picks the device grant; with --json the
    first line is the pending login's fields and the completed login follows as JSON."""
    providers = {PROVIDER: device_provider(shared_idp)}
    async with serving_broker(tmp_path, log_dir, providers, callback=False) as broker:
        command = await start_cli(broker, "--json")
        (line,) = await first_lines(command, 1)
        pending = json.loads(line)
        conftest.SECRETS.add(pending["user_code"])
        assert set(pending) == {
            "login_id",
            "verification_uri",
            "verification_uri_complete",
            "user_code",
            "expires_at",
        }
        await enter_user_code(pending["verification_uri_complete"], USER, "alice-password")
        status, rest, err = await finish(command)
        assert status == 0, err
        outcome = json.loads(rest)
        assert (outcome["login_id"], outcome["state"], outcome["user"]) == (
            pending["login_id"],
            "complete",
            USER,
        )


def modules(text: str) -> list[list[int]]:
    """The QR code drawn in half blocks, back as rows of modules (1 dark)."""
    rows: list[list[int]] = []
    for line in text.splitlines():
        pairs = [HALF_BLOCKS[ch] for ch in line]
        rows += [[top for top, _ in pairs], [bottom for _, bottom in pairs]]
    return rows


async def test_cli_device_login_on_a_terminal_draws_a_qr_code_of_the_complete_uri(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """With stdout a terminal the URI and code lines are followed by a QR code whose modules
    are exactly those of verification_uri_complete's QR code; scanning it (opening that URI)
    and accepting completes the login."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        master, slave = pty.openpty()
        try:
            command = await start_cli(broker, "--device", stdout=slave)
            os.close(slave)
            loop = asyncio.get_running_loop()
            decoder = codecs.getincrementaldecoder("utf-8")()
            screen = ""
            expected: list[list[int]] | None = None
            while expected is None or screen.count("\n") < 2 + (len(expected) + 1) // 2:
                chunk = await asyncio.wait_for(
                    loop.run_in_executor(None, os.read, master, 65536), CLI_TIMEOUT
                )
                assert chunk, "the command closed its terminal early"
                screen += decoder.decode(chunk).replace("\r\n", "\n")
                if expected is None and screen.count("\n") >= 2:
                    uri, code = screen.split("\n")[:2]
                    conftest.SECRETS.add(code)
                    complete = f"{uri}?user_code={code}"
                    qr = segno.make(complete, micro=False)
                    expected = [list(row) for row in qr.matrix_iter(border=2)]
            picture = screen.split("\n")[2:-1]
            drawn = modules("\n".join(picture))
            assert drawn[: len(expected)] == expected
            assert len(drawn) - len(expected) in (0, 1)  # an odd row count pads the last line
            await enter_user_code(complete, USER, "alice-password")
            status, _rest, err = await finish(command)
            assert status == 0, err
        finally:
            with contextlib.suppress(OSError):
                os.close(master)


async def test_an_interrupted_command_leaves_the_login_to_the_daemon(
    tmp_path: Path, log_dir: Path, shared_idp: DjangoIdP
) -> None:
    """Ctrl-C while waiting: the command exits 130 saying the login goes on; entering the code
    afterwards still completes it, and running the command again meanwhile shows the same code."""
    async with serving_broker(tmp_path, log_dir, {PROVIDER: device_provider(shared_idp)}) as broker:
        command = await start_cli(broker, "--device")
        uri, code = await first_lines(command, 2)
        conftest.SECRETS.add(code)
        await asyncio.sleep(0.5)  # it is waiting now
        command.send_signal(signal.SIGINT)
        status, _rest, err = await finish(command)
        assert status == 130, err
        assert "the login goes on in the daemon" in err

        again = await start_cli(broker, "--device")
        assert await first_lines(again, 2) == [uri, code]
        await enter_user_code(uri, USER, "alice-password", user_code=code)
        status, _rest, err = await finish(again)
        assert status == 0, err
        events = [json.loads(line) for line in broker.log().splitlines() if line.startswith("{")]
        (login_id,) = {e["login"] for e in events if e.get("event") == "login_started"}
        assert (await ended(broker, login_id))["state"] == "complete"
