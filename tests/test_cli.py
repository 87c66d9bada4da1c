"""Tests for broker.cli: `python -m broker` against a real daemon, and the parser in-process."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import broker
from broker.api.app import BULK_BODY_BYTES
from broker.cli import main
from broker.cli.remote import BULK_REQUEST_BYTES
from broker.crypto import write_keyring
from broker.model import Grant, GrantState, Secret, TokenSet
from broker.store.repository import GrantRepository
from tests.daemon import Home, clean_env, make_home, open_store, request, running_daemon

CLI_TIMEOUT = 60.0


def cli(
    home: Home, *args: str, stdin: str | None = None, log_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m broker ARGS` in the home directory; stderr also goes to `log_dir`."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=home.root,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if log_dir is not None:
        with (log_dir / "cli.stderr.log").open("a") as log:
            log.write(done.stderr)
    return done


@dataclass(frozen=True, slots=True)
class Issued:
    """The secrets of one imported grant."""

    user: str
    refresh_token: str
    access_token: str


def _import_via_api(home: Home, new_secret: Callable[[str], str], user: str) -> Issued:
    issued = Issued(user, new_secret("rt"), new_secret("at"))
    reply = request(
        home.socket,
        "POST",
        "/v1/grants",
        {
            "provider": "techniek",
            "user": user,
            "refresh_token": issued.refresh_token,
            "access_token": issued.access_token,
            "expires_in": 3600,
        },
    )
    assert reply.status == 201, reply.body
    return issued


def _served_token(home: Home, user: str) -> str:
    reply = request(home.socket, "GET", f"/v1/tokens/techniek/{user}")
    assert reply.status == 200, reply.body
    token: str = reply.json()["access_token"]
    return token


async def _seed(
    repository: GrantRepository,
    new_secret: Callable[[str], str],
    users: Sequence[str],
    *,
    refresh: bool = True,
    expires_in: int = 3600,
) -> list[Issued]:
    now = datetime.now(UTC)
    issued = []
    for user in users:
        grant = Issued(user, new_secret("rt"), new_secret("at"))
        await repository.insert(
            Grant(
                id="",
                provider="techniek",
                user=user,
                state=GrantState.ACTIVE,
                generation=0,
                tokens=TokenSet(
                    refresh_token=Secret(grant.refresh_token) if refresh else None,
                    access_token=Secret(grant.access_token),
                ),
                scopes=("openid",),
                access_expires_at=now + timedelta(seconds=expires_in),
            ),
            now,
        )
        issued.append(grant)
    return issued


def _key_counts(home: Home, log_dir: Path) -> dict[str, tuple[bool, int]]:
    done = cli(home, "keys", "status", "--json", "-c", str(home.config), log_dir=log_dir)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["unsealed_grants"] == 0
    return {row["key_id"]: (row["primary"], row["grants"]) for row in status["keys"]}


# -- the parser, in-process ------------------------------------------------------------------


def test_version_is_printed(tmp_path: Path) -> None:
    """`python -m broker --version` prints the version and exits 0."""
    done = cli(Home(tmp_path), "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"token-broker {broker.__version__}"


def test_config_option_works_before_and_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-c F check-config` and `check-config -c F` both read F."""
    home = make_home(tmp_path)
    for argv in (
        ["-c", str(home.config), "check-config"],
        ["check-config", "-c", str(home.config)],
    ):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{home.config}: ok")
        assert "2 provider(s)" in out


def test_config_option_between_a_group_and_its_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`db -c F upgrade` and `keys -c F status` read F, as `-c F db upgrade` does."""
    home = make_home(tmp_path)
    assert main(["db", "-c", str(home.config), "upgrade"]) == 0
    assert "store upgraded" in capsys.readouterr().out
    # Without F it would read /etc/token-broker/config.toml, which is not there: exit 1.
    assert main(["keys", "-c", str(home.config), "status"]) == 0


def test_config_option_after_a_client_command_picks_its_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Client commands find the socket from `-c` given before or after them (or between a
    group and its command), or from --socket."""
    home = make_home(tmp_path)
    other = tmp_path / "elsewhere.sock"
    cases = [
        (["-c", str(home.config), "grants", "list"], home.socket),
        (["grants", "list", "-c", str(home.config)], home.socket),
        (["grants", "-c", str(home.config), "list"], home.socket),
        (["token", "techniek", "alice", "-c", str(home.config)], home.socket),
        (["--socket", str(other), "grants", "list"], other),
        (["grants", "list", "--socket", str(other)], other),
        (["grants", "--socket", str(other), "show", "techniek", "alice"], other),
    ]
    for argv, sock in cases:
        assert main(argv) == 4, argv
        assert str(sock) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "purpose"),
    [
        ([], "access tokens to local services"),
        (["serve"], "Run the daemon"),
        (["check-config"], "Validate the config"),
        (["db", "upgrade"], "Migrate the store"),
        (["keys", "generate"], "new keyring"),
        (["keys", "rotate"], "re-encrypt every grant"),
        (["keys", "status"], "which key seals how many grants"),
        (["import"], "Import a refresh token"),
        (["grants", "list"], "List grants"),
        (["grants", "show"], "Show one grant"),
        (["token"], "Print a fresh access token"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_help_of_each_command_exits_0_and_says_its_purpose(
    argv: list[str], purpose: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`COMMAND --help` exits 0 and its text says what the command is for."""
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert purpose.lower() in text.lower()


@pytest.mark.parametrize(
    "argv", [["frobnicate"], [], ["keys"], ["grants", "burn"], ["token", "techniek"]]
)
def test_an_unknown_or_incomplete_command_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown command or missing arguments exit 2 with a usage message."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


# -- check-config and keys ---------------------------------------------------------------------


def test_check_config_accepts_a_valid_config(tmp_path: Path, log_dir: Path) -> None:
    """check-config on a valid file exits 0 and says ok."""
    home = make_home(tmp_path)
    done = cli(home, "check-config", "-c", str(home.config), log_dir=log_dir)
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


def test_check_config_prints_every_error(tmp_path: Path, log_dir: Path) -> None:
    """A config with several mistakes exits 1 and names each of them at once."""
    home = Home(tmp_path)
    home.config.write_text(
        """
[server]
socket_mode = "0777"
sockt = "/run/x.sock"
metrics = "nowhere"

[refresh]
jitter = 0.9
min_margin = "60"

[providers.techniek]
client_id = "broker-test"

[[clients]]
name = "billing"
grants = ["nope/*"]
"""
    )
    done = cli(home, "check-config", "-c", str(home.config), log_dir=log_dir)
    assert done.returncode == 1
    assert done.stdout == ""
    expected = [
        "server.socket_mode",
        'server.sockt: unknown key (did you mean "socket"?)',
        "server.metrics",
        "refresh.jitter",
        "refresh.min_margin",
        'write "60s" for seconds',
        "providers.techniek.redirect_uri: required",
        "providers.techniek.token_endpoint",
        "clients[0]: needs unix_user, unix_uid, unix_group or token_sha256",
        "clients[0].grants[0]",
    ]
    for problem in expected:
        assert problem in done.stderr, problem
    assert f"{len(done.stderr.splitlines()) - 1} problem(s)" in done.stderr


def test_keys_generate_writes_0600_and_refuses_to_overwrite(tmp_path: Path, log_dir: Path) -> None:
    """keys generate creates a 0600 keyring; a second run exits 1 and leaves the file alone."""
    home = Home(tmp_path)
    home.write_config()
    done = cli(home, "keys", "generate", "-c", str(home.config), log_dir=log_dir)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(home.key_file.stat().st_mode) == 0o600
    primary = home.keyring().primary
    assert primary in done.stdout
    before = home.key_file.read_bytes()
    again = cli(home, "keys", "generate", "-c", str(home.config), log_dir=log_dir)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert home.key_file.read_bytes() == before


async def test_keys_status_shows_the_primary_key_and_grant_counts(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """keys status lists each key, marks the primary and counts its grants (also as JSON)."""
    home = make_home(tmp_path)
    async with open_store(home) as repository:
        await _seed(repository, new_secret, ["a", "b", "c"])
    primary = home.keyring().primary
    done = cli(home, "keys", "status", "-c", str(home.config), log_dir=log_dir)
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["KEY", "PRIMARY", "GRANTS", "NOTE"]
    assert row.split() == [primary, "yes", "3"]
    assert _key_counts(home, log_dir) == {primary: (True, 3)}


def test_keys_rotate_moves_every_grant_and_tokens_survive_a_restart(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """30 grants imported over the API move to a new primary key; a restarted daemon serves them."""
    home = make_home(tmp_path)
    old = home.keyring().primary
    with running_daemon(home, log_dir, name="before"):
        issued = [_import_via_api(home, new_secret, f"user{i:02}") for i in range(30)]
        done = cli(home, "keys", "rotate", "-c", str(home.config), log_dir=log_dir)
        assert done.returncode == 0, done.stderr
        # The running daemon answers from memory and is not disturbed by the rotation.
        assert _served_token(home, "user07") == issued[7].access_token
    new = home.keyring().primary
    assert new != old
    assert set(home.keyring().keys) == {old, new}
    assert f"new primary key {new}" in done.stdout
    assert f"every grant is sealed with {new}" in done.stdout
    assert "30/30" in done.stderr
    assert _key_counts(home, log_dir) == {old: (False, 0), new: (True, 30)}
    with running_daemon(home, log_dir, name="after"):
        assert [_served_token(home, grant.user) for grant in issued] == [
            grant.access_token for grant in issued
        ]


async def test_an_interrupted_rotation_resumes_and_loses_nothing(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """After a rotation stopped one batch in, `keys rotate` says it resumes and finishes it."""
    home = make_home(tmp_path)
    old = home.keyring()
    async with open_store(home) as repository:
        issued = await _seed(repository, new_secret, [f"user{i:02}" for i in range(30)])
        # What `keys rotate` does before it is interrupted: the new keyring is on disk first,
        # then one batch of rows moves.
        rotated = old.with_new_primary(datetime.now(UTC))
        write_keyring(home.key_file, rotated, replace=True)
        repository.keyring = rotated
        assert await repository.reseal_batch(10) == 10
    assert _key_counts(home, log_dir) == {old.primary: (False, 20), rotated.primary: (True, 10)}

    done = cli(home, "keys", "rotate", "-c", str(home.config), log_dir=log_dir)
    assert done.returncode == 0, done.stderr
    assert f"resuming: 20 grant(s) not yet under primary key {rotated.primary}" in done.stdout
    assert "20/20" in done.stderr
    assert set(home.keyring().keys) == {old.primary, rotated.primary}
    assert _key_counts(home, log_dir) == {old.primary: (False, 0), rotated.primary: (True, 30)}
    async with open_store(home) as repository:
        stored = {grant.user: grant for grant in await repository.all()}
    assert sorted(stored) == [grant.user for grant in issued]
    for grant in issued:
        tokens = stored[grant.user].tokens
        assert tokens.refresh_token == Secret(grant.refresh_token)
        assert tokens.access_token == Secret(grant.access_token)
        assert stored[grant.user].key_id == rotated.primary
        assert stored[grant.user].generation == 1


# -- client commands against a running daemon --------------------------------------------------


def test_import_from_files_then_token_prints_exactly_the_access_token(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """import reads the tokens from files; `token` prints the access token and nothing else."""
    home = make_home(tmp_path)
    refresh, access = new_secret("rt"), new_secret("at")
    (tmp_path / "refresh").write_text(refresh + "\n")
    (tmp_path / "access").write_text(access)
    config = ["-c", str(home.config)]
    with running_daemon(home, log_dir):
        done = cli(
            home,
            "import",
            "techniek",
            "alice",
            "--refresh-token-file",
            "refresh",
            "--access-token-file",
            "access",
            "--expires-in",
            "3600",
            *config,
            log_dir=log_dir,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "imported techniek/alice (generation 1)\n"
        token = cli(home, "token", "techniek", "alice", *config, log_dir=log_dir)
        assert token.returncode == 0, token.stderr
        assert token.stdout == access + "\n"
        as_json = cli(home, "token", "techniek", "alice", "--json", *config, log_dir=log_dir)
        assert json.loads(as_json.stdout)["access_token"] == access
    for output in (done.stdout, done.stderr, token.stderr):
        assert refresh not in output


def test_import_reads_the_refresh_token_from_stdin(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """`--refresh-token-file -` reads standard input; the grant then exists with a refresh token."""
    home = make_home(tmp_path)
    refresh = new_secret("rt")
    config = ["-c", str(home.config)]
    with running_daemon(home, log_dir):
        done = cli(
            home,
            "import",
            "netid",
            "bob",
            "--refresh-token-file",
            "-",
            "--json",
            *config,
            stdin=refresh + "\n",
            log_dir=log_dir,
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert (summary["provider"], summary["user"], summary["generation"]) == ("netid", "bob", 1)
        assert summary["has_refresh_token"] is True
        assert refresh not in done.stdout
        twice = cli(
            home,
            "import",
            "netid",
            "bob",
            "--refresh-token-file",
            "-",
            *config,
            stdin=refresh,
            log_dir=log_dir,
        )
        assert twice.returncode == 1
        assert "already exists" in twice.stderr
        empty = cli(
            home,
            "import",
            "netid",
            "carol",
            "--refresh-token-file",
            "-",
            *config,
            stdin="\n",
            log_dir=log_dir,
        )
        assert empty.returncode == 1
        assert "exactly one token" in empty.stderr


def test_grants_list_and_show_and_a_missing_grant(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """grants list (table and JSON) and show describe the grants; a missing one exits 1."""
    home = make_home(tmp_path)
    config = ["-c", str(home.config)]
    with running_daemon(home, log_dir):
        empty = cli(home, "grants", "list", *config, log_dir=log_dir)
        assert (empty.returncode, empty.stdout) == (0, "no grants\n")
        issued = [_import_via_api(home, new_secret, user) for user in ("alice", "bob")]
        table = cli(home, "grants", "list", *config, log_dir=log_dir)
        listing = cli(home, "grants", "list", "--json", *config, log_dir=log_dir)
        show = cli(home, "grants", "show", "techniek", "alice", *config, log_dir=log_dir)
        show_json = cli(
            home, "grants", "show", "techniek", "bob", "--json", *config, log_dir=log_dir
        )
        missing = cli(home, "grants", "show", "techniek", "nobody", *config, log_dir=log_dir)
    for done in (table, listing, show, show_json):
        assert done.returncode == 0, done.stderr
        for grant in issued:
            assert grant.refresh_token not in done.stdout
            assert grant.access_token not in done.stdout
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["GRANT", "STATE", "SUB"]
    assert [row.split()[:3] for row in rows] == [
        ["techniek/alice", "active", "-"],
        ["techniek/bob", "active", "-"],
    ]
    grants = json.loads(listing.stdout)
    assert [(g["provider"], g["user"], g["state"]) for g in grants] == [
        ("techniek", "alice", "active"),
        ("techniek", "bob", "active"),
    ]
    assert json.loads(show_json.stdout) == grants[1]
    lines = dict(line.split(":", 1) for line in show.stdout.splitlines())
    assert lines["user"].strip() == "alice"
    assert lines["state"].strip() == "active"
    assert lines["scopes"].strip() == "openid profile"
    assert lines["generation"].strip() == "1"
    assert missing.returncode == 1
    assert "no grant techniek/nobody (grant_not_found)" in missing.stderr


def test_a_daemon_that_is_not_running_is_exit_4_naming_the_socket(
    tmp_path: Path, log_dir: Path
) -> None:
    """With nothing listening, client commands exit 4 and name the socket path they tried."""
    home = make_home(tmp_path)
    for args in (["token", "techniek", "alice"], ["grants", "list"]):
        done = cli(home, *args, "-c", str(home.config), log_dir=log_dir)
        assert done.returncode == 4
        assert str(home.socket) in done.stderr
        assert done.stdout == ""


async def test_reauth_required_is_exit_3(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """`token` for a grant without refresh token whose access token expired exits 3."""
    home = make_home(tmp_path)
    async with open_store(home) as repository:
        await _seed(repository, new_secret, ["carol"], refresh=False, expires_in=-60)
        await _seed(repository, new_secret, ["dave"], refresh=False, expires_in=3600)
    with running_daemon(home, log_dir):
        expired = cli(home, "token", "techniek", "carol", "-c", str(home.config), log_dir=log_dir)
        live = cli(home, "token", "techniek", "dave", "-c", str(home.config), log_dir=log_dir)
    assert expired.returncode == 3, expired.stderr
    assert "reauth_required" in expired.stderr
    assert expired.stdout == ""
    assert live.returncode == 0, live.stderr


def test_a_bulk_import_request_fits_the_daemons_limit_for_them() -> None:
    """The CLI's batches (kept apart so client commands need not load aiohttp) stay within
    what the daemon takes in one bulk import request."""
    assert BULK_REQUEST_BYTES <= BULK_BODY_BYTES


def test_a_bulk_import_stores_the_good_lines_and_names_each_bad_one(
    tmp_path: Path, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """`import --jsonl FILE` stores every good line (in batches of one transaction each),
    replaces with force, and reports each failed line by number and reason, never a token;
    exit 1 when any failed."""
    home = make_home(tmp_path)
    # Long tokens: 700 lines are more than one request's worth, so line numbers cross requests.
    tokens = {f"u{i:04}": new_secret("rt") + "-" + "p" * 400 for i in range(700)}
    lines = [
        json.dumps({"provider": "techniek", "user": u, "refresh_token": t})
        for u, t in tokens.items()
    ]
    bad = {
        702: "{not json",
        703: json.dumps({"provider": "nowhere", "user": "x", "refresh_token": new_secret("rt")}),
        704: json.dumps(
            {"provider": "techniek", "user": "u0001", "refresh_token": new_secret("rt")}
        ),
        705: json.dumps({"provider": "techniek", "user": "y", "refresh_token": "two words"}),
        706: json.dumps({"provider": "techniek", "user": "z", "refresh_token": "x", "colour": 1}),
        # A lone surrogate (only an escape can carry one) is not text.
        707: json.dumps({"provider": "techniek", "user": "w", "refresh_token": "a\ud800"}),
        708: json.dumps({"provider": "techniek", "user": "v", "refresh_token": "no\u00a0break"}),
    }
    replaced = json.dumps(
        {"provider": "techniek", "user": "u0002", "refresh_token": new_secret("rt"), "force": True}
    )
    body = "\n".join([*lines, "", *bad.values(), replaced]) + "\n"
    assert len(body) > BULK_REQUEST_BYTES
    path = tmp_path / "grants.jsonl"
    path.write_text(body)
    config = ["-c", str(home.config)]
    with running_daemon(home, log_dir):
        done = cli(home, "import", "--jsonl", str(path), *config, log_dir=log_dir)
        assert done.returncode == 1, done.stderr
        assert done.stdout.strip() == "created 700, replaced 1, failed 7"
        reasons = dict(
            line.split(": ", 1)
            for line in done.stderr.strip().splitlines()
            if line.startswith("line ")
        )
        assert set(reasons) == {f"line {n}" for n in bad}
        assert "JSON" in reasons["line 702"]
        assert "unknown provider" in reasons["line 703"]
        assert "already exists" in reasons["line 704"]
        assert "whitespace" in reasons["line 705"]
        assert "unknown field" in reasons["line 706"]
        assert "not a JSON object in UTF-8" in reasons["line 707"]
        assert "whitespace" in reasons["line 708"]
        assert not any(token in done.stdout + done.stderr for token in tokens.values())
        listed = json.loads(cli(home, "grants", "list", "--json", *config).stdout)
        assert len(listed) == 700
        assert {g["user"]: g["generation"] for g in listed}["u0002"] == 2
        again = cli(home, "import", "--jsonl", "-", "--json", *config, stdin=lines[5] + "\n")
        assert again.returncode == 1
        answer = json.loads(again.stdout)
        assert (answer["created"], answer["replaced"]) == (0, 0)
        assert [f["line"] for f in answer["failed"]] == [1]
        assert "techniek/u0005 already exists" in answer["failed"][0]["reason"]
