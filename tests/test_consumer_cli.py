"""Tests for the consumer commands of broker.cli: `token --format` and `git-credential`.

Each runs `python -m broker` against a real daemon (tests/daemon.py) holding an imported
grant. The ExecCredential is checked against the client.authentication.k8s.io/v1 schema,
written here from client-go's types (pkg/apis/clientauthentication/v1/types.go) and the checks
client-go's exec authenticator applies to a plugin's output (plugin/pkg/client/auth/exec).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from tests.daemon import DaemonProcess, Home, make_home, request, running_daemon
from tests.test_cli import cli

# ExecCredential as client-go decodes it: TypeMeta inline, spec (omitempty), status with
# expirationTimestamp (metav1.Time: RFC 3339), token, clientCertificateData, clientKeyData.
# client-go then requires: the configured apiVersion, a status, a token or a cert/key pair,
# and both halves of a pair or neither.
EXEC_CREDENTIAL_V1: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "status"],
    "properties": {
        "apiVersion": {"const": "client.authentication.k8s.io/v1"},
        "kind": {"const": "ExecCredential"},
        "spec": {
            "type": "object",
            "properties": {"cluster": {"type": "object"}, "interactive": {"type": "boolean"}},
        },
        "status": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "expirationTimestamp": {
                    "type": "string",
                    "format": "date-time",
                    "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$",
                },
                "token": {"type": "string"},
                "clientCertificateData": {"type": "string"},
                "clientKeyData": {"type": "string"},
            },
            "anyOf": [
                {"required": ["token"], "properties": {"token": {"minLength": 1}}},
                {"required": ["clientCertificateData", "clientKeyData"]},
            ],
            "dependentRequired": {
                "clientCertificateData": ["clientKeyData"],
                "clientKeyData": ["clientCertificateData"],
            },
        },
    },
}
GIT_USERNAME = "broker-bot"


def exec_credential_problems(document: object) -> list[str]:
    """Where `document` breaks the ExecCredential v1 schema (paths and keywords, no values)."""
    validator = Draft202012Validator(EXEC_CREDENTIAL_V1, format_checker=FormatChecker())
    return [f"{e.json_path}: {e.validator}" for e in validator.iter_errors(document)]


def write_config(home: Home) -> None:
    """The home's config with techniek's git_username set."""
    home.write_config()
    text = home.config.read_text()
    home.config.write_text(
        text.replace(
            "[providers.techniek]\n", f'[providers.techniek]\ngit_username = "{GIT_USERNAME}"\n'
        )
    )


def import_grant(home: Home, access: str, refresh: str) -> dict[str, Any]:
    """Import techniek/alice; the token route's answer for it."""
    body = {
        "provider": "techniek",
        "user": "alice",
        "refresh_token": refresh,
        "access_token": access,
        "expires_in": 3600,
    }
    assert request(home.socket, "POST", "/v1/grants", body).status == 201
    served = request(home.socket, "GET", "/v1/tokens/techniek/alice")
    assert served.status == 200
    token: dict[str, Any] = served.json()
    return token


@pytest.fixture
def daemon(tmp_path: Path, log_dir: Path) -> Iterator[DaemonProcess]:
    """A running daemon on a home whose techniek provider has a git_username."""
    home = make_home(tmp_path)
    write_config(home)
    with running_daemon(home, log_dir) as running:
        yield running


def test_the_exec_credential_validator_refuses_what_client_go_refuses() -> None:
    """The schema catches each output client-go's exec authenticator rejects."""
    good = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "t", "expirationTimestamp": "2030-01-02T03:04:05Z"},
    }
    assert exec_credential_problems(good) == []
    for bad in (
        {**good, "apiVersion": "client.authentication.k8s.io/v1beta1"},
        {k: v for k, v in good.items() if k != "status"},
        {**good, "status": {}},
        {**good, "status": {"token": ""}},
        {**good, "status": {"clientCertificateData": "pem"}},
        {**good, "status": {"token": "t", "expirationTimestamp": "2030-01-02 03:04:05"}},
        {**good, "status": {"token": "t", "expires": "2030-01-02T03:04:05Z"}},
    ):
        assert exec_credential_problems(bad), bad


def test_token_formats_print_the_token_json_a_header_and_an_exec_credential(
    daemon: DaemonProcess, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """--format token|json|header|exec-credential each print the served token their way; the
    ExecCredential is valid v1 with the token and its expiry."""
    home = daemon.home
    access = new_secret("at")
    served = import_grant(home, access, new_secret("rt"))
    config = ["-c", str(home.config)]

    def run(*extra: str) -> str:
        done = cli(home, "token", "techniek", "alice", *extra, *config, log_dir=log_dir)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run() == access + "\n"
    assert run("--format", "token") == access + "\n"
    assert json.loads(run("--format", "json")) == {**served, "expires_in": pytest.approx(3600, 5)}
    assert run("--format", "header") == f"Authorization: Bearer {access}\n"
    credential = json.loads(run("--format", "exec-credential"))
    assert exec_credential_problems(credential) == []
    assert credential["status"]["token"] == access
    assert credential["status"]["expirationTimestamp"] == served["expires_at"]
    assert datetime.fromisoformat(credential["status"]["expirationTimestamp"]).tzinfo is not None


def test_an_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    """--format outside the four is exit 2 naming the choices."""
    home = make_home(tmp_path)
    done = cli(home, "token", "techniek", "alice", "--format", "yaml", "-c", str(home.config))
    assert done.returncode == 2
    assert "exec-credential" in done.stderr


def test_git_credential_get_answers_git_with_username_password_and_expiry(
    daemon: DaemonProcess, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """`get` reads git's request and answers the provider's git_username, the access token
    and its expiry as a Unix time, and nothing else; --username overrides the name."""
    home = daemon.home
    access = new_secret("at")
    served = import_grant(home, access, new_secret("rt"))
    expiry = int(datetime.fromisoformat(served["expires_at"]).timestamp())
    config = ["-c", str(home.config)]
    git_request = "protocol=https\nhost=gitlab.example.com\npath=group/repo.git\n\n"
    done = cli(home, "git-credential", "techniek/alice", "get", *config, stdin=git_request)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"username={GIT_USERNAME}\npassword={access}\npassword_expiry_utc={expiry}\n"
    )
    assert done.stderr == ""
    named = cli(
        home,
        "git-credential",
        "techniek/alice",
        "get",
        "--username",
        "someone",
        *config,
        stdin=git_request,
    )
    assert named.stdout.splitlines()[0] == "username=someone"


def test_git_credential_store_and_erase_are_accepted_and_do_nothing(
    daemon: DaemonProcess, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """`store` and `erase` read git's lines, print nothing and exit 0; the grant is unchanged."""
    home = daemon.home
    access = new_secret("at")
    import_grant(home, access, new_secret("rt"))
    lines = f"protocol=https\nhost=h\nusername={GIT_USERNAME}\npassword={access}\n\n"
    for operation in ("store", "erase"):
        done = cli(
            home, "git-credential", "techniek/alice", operation, "-c", str(home.config), stdin=lines
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    again = request(home.socket, "GET", "/v1/tokens/techniek/alice")
    assert again.json()["access_token"] == access


def test_git_credential_failures_print_no_password_and_exit_non_zero(
    daemon: DaemonProcess, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """A missing grant, plain http to a remote host and a daemon that is not there each say
    why on stderr, print nothing on stdout and exit non-zero, so git tries its next helper;
    plain http to a loopback host is answered."""
    home = daemon.home
    import_grant(home, new_secret("at"), new_secret("rt"))
    config = ["-c", str(home.config)]
    cases = {
        ("techniek/nobody", "protocol=https\nhost=h\n"): (1, "no grant techniek/nobody"),
        ("techniek/alice", "protocol=http\nhost=forge.example.com\n"): (1, "use an https://"),
        ("techniek", "protocol=https\nhost=h\n"): (2, "is not PROVIDER/USER"),
    }
    for (grant, lines), (code, message) in cases.items():
        done = cli(home, "git-credential", grant, "get", *config, stdin=lines + "\n")
        assert done.returncode == code, done.stderr
        assert done.stdout == ""
        assert message in done.stderr
    loopback = cli(
        home,
        "git-credential",
        "techniek/alice",
        "get",
        *config,
        stdin="protocol=http\nhost=127.0.0.1:8080\n\n",
    )
    assert loopback.returncode == 0, loopback.stderr
    daemon.stop()
    gone = cli(home, "git-credential", "techniek/alice", "get", *config, stdin="host=h\n\n")
    assert gone.returncode == 4
    assert gone.stdout == ""
    assert str(home.socket) in gone.stderr


def test_git_credential_without_a_readable_config_answers_oauth2_on_the_given_socket(
    daemon: DaemonProcess, log_dir: Path, new_secret: Callable[[str], str]
) -> None:
    """A user who may not read the config passes --socket; the username is then oauth2."""
    home = daemon.home
    access = new_secret("at")
    import_grant(home, access, new_secret("rt"))
    missing = home.root / "no-such-config.toml"
    done = cli(
        home,
        "git-credential",
        "techniek/alice",
        "get",
        "--socket",
        str(home.socket),
        "-c",
        str(missing),
        stdin="protocol=https\nhost=h\n\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["username=oauth2", f"password={access}"]
    assert not missing.exists()


def test_check_config_counts_sinks_and_names_every_sink_problem(tmp_path: Path) -> None:
    """check-config counts valid sinks, and for bad ones exits 1 naming each problem."""
    home = make_home(tmp_path)
    base = home.config.read_text()
    home.config.write_text(
        base + '\n[[sinks]]\ngrant = "techniek/alice"\npath = "alice.token"\nmode = "0640"\n'
    )
    done = cli(home, "check-config", "-c", str(home.config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("1 sink(s))")
    home.config.write_text(
        base + '\n[[sinks]]\ngrant = "techniek/*"\npath = "a"\nmode = "0644"\ngroup = "nope-x"\n'
    )
    done = cli(home, "check-config", "-c", str(home.config))
    assert done.returncode == 1
    for problem in ("sinks[0].grant", "sinks[0].mode", "no group named 'nope-x'"):
        assert problem in done.stderr, problem
