"""Tests for broker.config: TOML in, frozen validated config out, every problem at once."""

from __future__ import annotations

import dataclasses
import grp
import pwd
import re
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest

from broker.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ClientConfig,
    Config,
    Listen,
    ProviderConfig,
    RefreshConfig,
    ServerConfig,
    SinkConfig,
    StoreConfig,
    load_config,
    parse_config,
    parse_duration,
    resolve_config_path,
)
from broker.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
BASE = Path("/etc/tb")

PROVIDER = """
    [providers.p]
    issuer = "https://idp.example.nl/o"
    client_id = "c"
    redirect_uri = "http://localhost:8000/cb/"
"""


def parse(text: str, base_dir: Path = BASE) -> Config:
    """Parse TOML text as a config file living in `base_dir`."""
    return parse_config(tomllib.loads(text), source="test.toml", base_dir=base_dir)


def problems(text: str) -> list[str]:
    """The problems a ConfigError reports for this TOML text."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert info.value.source == "test.toml"
    return info.value.problems


def test_example_file_parses() -> None:
    """The shipped config.example.toml is a valid config with the techniek provider."""
    config = load_config(EXAMPLE)
    techniek = config.providers["techniek"]
    assert techniek.issuer == "https://idp.example.nl/o"
    assert techniek.client_id == "broker-test"
    assert techniek.scopes == ("openid", "profile", "FGO", "FGOWS")
    assert techniek.redirect_uri == "http://localhost:8000/oauth-callback/"
    assert [c.name for c in config.clients] == ["billing"]


def test_example_file_documents_every_key_and_its_commented_keys_parse() -> None:
    """Uncommenting every `# key = value` line of the example still parses, and covers every key."""
    lines = EXAMPLE.read_text().splitlines()
    uncommented = [
        re.sub(r"^# (?=[a-z0-9_]+ = |\[[a-z.]+\]$|\[\[[a-z]+\]\]$)", "", line) for line in lines
    ]
    config = parse("\n".join(uncommented), base_dir=EXAMPLE.parent)
    assert config.server.tcp == Listen("127.0.0.1", 8470)
    assert config.providers["netid"].access_token_from.claim == "permission_management"
    assert config.providers["techniek"].client_auth == "client_secret_basic"
    assert config.sinks[0].owner == 1001
    documented = {m.group(1) for line in uncommented if (m := re.match(r"([a-z0-9_]+) = ", line))}
    sections = (ServerConfig, StoreConfig, RefreshConfig, ProviderConfig, ClientConfig, SinkConfig)
    assert {f.name for cls in sections for f in dataclasses.fields(cls)} <= documented


def test_empty_config_gives_documented_defaults() -> None:
    """An empty file yields every documented default and no providers or clients."""
    config = parse("")
    assert config.server.socket == Path("/run/token-broker/broker.sock")
    assert config.server.socket_mode == 0o660
    assert config.server.tcp is None
    assert config.server.callback == Listen("127.0.0.1", 8000)
    assert config.server.metrics == Listen("127.0.0.1", 9464)
    assert config.store.url == "sqlite:////var/lib/token-broker/broker.db"
    assert config.store.key_file == Path("/etc/token-broker/keys")
    assert config.refresh.lifetime_fraction == 0.75
    assert config.refresh.min_margin == timedelta(seconds=60)
    assert config.refresh.jitter == 0.1
    assert config.refresh.max_concurrency == 8
    assert dict(config.providers) == {}
    assert config.clients == ()


def test_provider_and_client_defaults() -> None:
    """A minimal provider and client get the documented defaults."""
    config = parse(PROVIDER + '[[clients]]\nname = "a"\nunix_uid = 0\n')
    p = config.providers["p"]
    assert p.name == "p"
    assert p.scopes == ("openid",)
    assert p.client_auth == "none"
    assert p.client_secret_file is None
    assert p.access_token_from.kind == "token_response"
    assert p.refresh_grace == timedelta(0)
    assert p.rotates_refresh_tokens is True
    assert config.clients[0] == ClientConfig("a", None, 0, None, None, (), admin=False)


def test_config_is_immutable() -> None:
    """The parsed config cannot be changed, not even its providers mapping."""
    config = parse(PROVIDER)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.refresh.jitter = 0.2  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.providers["q"] = config.providers["p"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("10h", timedelta(hours=10)),
        ("1d", timedelta(days=1)),
        ("500ms", timedelta(milliseconds=500)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration_accepts_units(text: str, expected: timedelta) -> None:
    """Whole numbers with ms, s, m, h or d units, alone or combined, are durations."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "s", "1.5h", "-5s", "10 s", "5x", "1h 30m", "٣s"])
def test_parse_duration_rejects_other_text(text: str) -> None:
    """Anything but whole numbers with known units is a ValueError that shows an example."""
    with pytest.raises(ValueError, match='such as "30s"'):
        parse_duration(text)


def test_parse_duration_suggests_unit_for_bare_number() -> None:
    """A bare number is refused with a hint to write it in seconds."""
    with pytest.raises(ValueError, match='write "30s"'):
        parse_duration("30")


def test_duration_given_as_toml_integer_asks_for_a_string() -> None:
    """`min_margin = 30` is refused with the expected form spelled out."""
    assert problems("[refresh]\nmin_margin = 30\n") == [
        'refresh.min_margin: expected a duration string such as "30s", got integer'
    ]


def test_every_error_is_reported_at_once() -> None:
    """A config with mistakes in every section reports all of them, each with its key path."""
    found = problems(
        """
        [server]
        socket_mode = "0666"
        [store]
        url = "mysql://db/broker"
        [refresh]
        jitter = "lots"
        [providers.p]
        client_id = 42
        redirect_uri = "http://localhost:8000/cb/"
        issuer = "https://idp.example.nl/o"
        [[clients]]
        unix_user = "billing"
        """
    )
    prefixes = [
        "server.socket_mode:",
        "store.url:",
        "refresh.jitter: expected a number, got string",
        "providers.p.client_id: expected a string, got integer",
        "clients[0].name: required",
    ]
    assert len(found) == len(prefixes)
    for prefix, problem in zip(prefixes, found, strict=True):
        assert problem.startswith(prefix)


def test_config_error_message_lists_every_problem() -> None:
    """The ConfigError's text names the source and each problem on its own line."""
    with pytest.raises(ConfigError) as info:
        parse("[refresh]\njitter = 0.9\nmax_concurrency = 0\n")
    assert str(info.value).startswith("test.toml: 2 problem(s):\n  - refresh.jitter:")
    assert "\n  - refresh.max_concurrency: must be from 1 to 1000" in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            PROVIDER + "scope = []\n",
            'providers.p.scope: unknown key (did you mean "scopes"?)',
        ),
        (
            "[server]\nsocket_mod = '0660'\n",
            'server.socket_mod: unknown key (did you mean "socket_mode"?)',
        ),
        ("[refersh]\n", 'refersh: unknown key (did you mean "refresh"?)'),
        (
            "[[clients]]\nname = 'a'\nunix_uid = 1\ngrant = []\n",
            'clients[0].grant: unknown key (did you mean "grants"?)',
        ),
        ("[store]\nzzz = 1\n", "store.zzz: unknown key"),
    ],
)
def test_unknown_key_is_an_error_with_a_hint(text: str, problem: str) -> None:
    """An unknown key at any level is named by its full path, with a close match if any."""
    assert problems(text) == [problem]


def test_wrong_types_name_the_expected_type() -> None:
    """A value of the wrong TOML type is reported with the type expected and the type found."""
    found = problems(
        """
        server = "x"
        [refresh]
        lifetime_fraction = true
        max_concurrency = 2.5
        """
    )
    assert found == [
        "server: expected a table, got string",
        "refresh.lifetime_fraction: expected a number, got boolean",
        "refresh.max_concurrency: expected an integer, got float",
    ]


def test_booleans_are_not_numbers() -> None:
    """`true` is refused where a number or uid is expected even though bool subclasses int."""
    found = problems("[refresh]\njitter = false\n[[clients]]\nname = 'a'\nunix_uid = true\n")
    assert found == [
        "refresh.jitter: expected a number, got boolean",
        "clients[0].unix_uid: expected an integer, got boolean",
    ]


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("lifetime_fraction", "0", "greater than 0 and less than 1"),
        ("lifetime_fraction", "1.0", "greater than 0 and less than 1"),
        ("jitter", "-0.1", "at least 0 and less than 0.5"),
        ("jitter", "0.5", "at least 0 and less than 0.5"),
        ("max_concurrency", "1001", "from 1 to 1000"),
        ("min_margin", '"-1s"', "invalid duration"),
    ],
)
def test_refresh_values_out_of_range(key: str, value: str, reason: str) -> None:
    """Refresh settings outside their documented ranges are refused with the range."""
    [problem] = problems(f"[refresh]\n{key} = {value}\n")
    assert problem.startswith(f"refresh.{key}: ")
    assert reason in problem


@pytest.mark.parametrize("mode", ["0600", "660", "0770", "0664", "700"])
def test_socket_mode_accepts_octal_strings(mode: str) -> None:
    """A socket mode of 3-4 octal digits that denies "other" write is accepted."""
    assert parse(f'[server]\nsocket_mode = "{mode}"\n').server.socket_mode == int(mode, 8)


@pytest.mark.parametrize("value", ['"0666"', '"0662"', '"4660"', '"0680"', '"66"', "0o660", "660"])
def test_socket_mode_rejects_unsafe_or_malformed(value: str) -> None:
    """Modes letting others write, beyond 0777, not octal, or not a string are refused."""
    [problem] = problems(f"[server]\nsocket_mode = {value}\n")
    assert problem.startswith("server.socket_mode: ")


@pytest.mark.parametrize("address", ["10.0.0.1:8470", "0.0.0.0:8470", "[::]:8470"])
def test_tcp_listener_must_be_loopback(address: str) -> None:
    """A non-loopback TCP listener is refused because bearer tokens travel in clear."""
    [problem] = problems(f'[server]\ntcp = "{address}"\n')
    assert problem.startswith("server.tcp: ")
    assert "must be a loopback address, because bearer tokens travel in clear" in problem


@pytest.mark.parametrize(
    ("address", "listen", "shown"),
    [
        ("127.0.0.1:8470", Listen("127.0.0.1", 8470), "127.0.0.1:8470"),
        ("127.5.6.7:1", Listen("127.5.6.7", 1), "127.5.6.7:1"),
        ("[::1]:65535", Listen("::1", 65535), "[::1]:65535"),
        ("localhost:8470", Listen("localhost", 8470), "localhost:8470"),
    ],
)
def test_tcp_listener_on_loopback_is_accepted(address: str, listen: Listen, shown: str) -> None:
    """Loopback addresses, IPv6 in brackets and localhost are valid TCP listeners."""
    tcp = parse(f'[server]\ntcp = "{address}"\n').server.tcp
    assert tcp == listen
    assert str(tcp) == shown


def test_callback_and_metrics_take_any_ip_and_empty_disables() -> None:
    """Callback and metrics may bind any IP literal; an empty string disables the listener."""
    server = parse('[server]\ncallback = "[::]:8000"\nmetrics = ""\ntcp = ""\n').server
    assert server.callback == Listen("::", 8000)
    assert server.metrics is None
    assert server.tcp is None


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("::1:8000", "in brackets"),
        ("127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("127.0.0.1:65536", "port must be a number from 1 to 65535"),
        ("127.0.0.1", "expected"),
        (":8000", "expected"),
        ("example.org:8000", "not an IP address or localhost"),
    ],
)
def test_malformed_listen_address(address: str, reason: str) -> None:
    """A listen address must be HOST:PORT with an IP literal or localhost and a valid port."""
    [problem] = problems(f'[server]\nmetrics = "{address}"\n')
    assert problem.startswith("server.metrics: ")
    assert reason in problem


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    """Relative socket, key file, secret file and sqlite paths start at the file's directory."""
    path = tmp_path / "config.toml"
    path.write_text(
        PROVIDER
        + """
        client_secret_file = "secrets/p.secret"
        [server]
        socket = "run/broker.sock"
        [store]
        url = "sqlite:///data/broker.db"
        key_file = "keys"
        """
    )
    config = load_config(path)
    assert config.source == str(path)
    assert config.server.socket == tmp_path / "run/broker.sock"
    assert config.store.key_file == tmp_path / "keys"
    assert config.store.url == f"sqlite:///{tmp_path}/data/broker.db"
    assert config.store.url.startswith("sqlite:////")
    assert config.providers["p"].client_secret_file == tmp_path / "secrets/p.secret"


def test_absolute_paths_are_kept() -> None:
    """Absolute paths do not depend on the config directory."""
    config = parse('[server]\nsocket = "/run/x.sock"\n[store]\nkey_file = "/k"\n')
    assert config.server.socket == Path("/run/x.sock")
    assert config.store.key_file == Path("/k")


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("sqlite:////var/lib/b.db", "sqlite:////var/lib/b.db"),
        ("sqlite:///b.db", "sqlite:////etc/tb/b.db"),
        ("sqlite:///data/b.db", "sqlite:////etc/tb/data/b.db"),
        ("postgresql://broker@db.example.nl/broker", "postgresql://broker@db.example.nl/broker"),
        ("postgresql+asyncpg://broker@db/broker", "postgresql://broker@db/broker"),
        ("postgresql:///broker", "postgresql:///broker"),
    ],
)
def test_store_url_is_normalised(url: str, normalised: str) -> None:
    """sqlite URLs become absolute with four slashes; postgresql URLs lose their driver."""
    assert parse(f'[store]\nurl = "{url}"\n').store.url == normalised


@pytest.mark.parametrize(
    "url",
    ["mysql://db/broker", "postgres://db/broker", "sqlite://b.db", "sqlite:///", "postgresql://"],
)
def test_store_url_with_unsupported_scheme(url: str) -> None:
    """Other schemes and empty paths are refused, naming the supported schemes."""
    [problem] = problems(f'[store]\nurl = "{url}"\n')
    assert problem.startswith("store.url: expected sqlite:///PATH, postgresql://")


def test_provider_without_issuer_needs_both_endpoints() -> None:
    """With no issuer, authorization_endpoint and token_endpoint are each required."""
    found = problems('[providers.p]\nclient_id = "c"\nredirect_uri = "https://b.example.nl/cb"\n')
    assert found == [
        'providers.p.authorization_endpoint: required when there is no "issuer"'
        ' (set "issuer" for OIDC discovery)',
        'providers.p.token_endpoint: required when there is no "issuer"'
        ' (set "issuer" for OIDC discovery)',
    ]


def test_plain_oauth_provider_with_endpoints() -> None:
    """A provider with both endpoints and no issuer is valid and keeps its endpoints."""
    config = parse(
        """
        [providers.gh]
        authorization_endpoint = "https://idp.example.nl/authorize"
        token_endpoint = "https://idp.example.nl/token"
        client_id = "c"
        redirect_uri = "http://127.0.0.1:8000/cb/"
        scopes = []
        """
    )
    provider = config.providers["gh"]
    assert provider.issuer is None
    assert provider.token_endpoint == "https://idp.example.nl/token"
    assert provider.scopes == ()


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://idp.example.nl/o", True),
        ("http://localhost:8080/o", True),
        ("http://127.0.0.1/o", True),
        ("http://[::1]:9000/o", True),
        ("http://idp.example.nl/o", False),
        ("ftp://idp.example.nl/o", False),
        ("idp.example.nl", False),
        ("https://", False),
    ],
)
def test_endpoint_urls_need_https_except_on_loopback(url: str, ok: bool) -> None:
    """Issuer and endpoint URLs must be https, or http only for a loopback host."""
    text = PROVIDER.replace("https://idp.example.nl/o", url) + f'jwks_uri = "{url}"\n'
    if ok:
        assert parse(text).providers["p"].jwks_uri == url
    else:
        assert [p.split(":")[0] for p in problems(text)] == [
            "providers.p.issuer",
            "providers.p.jwks_uri",
        ]


def test_provider_required_keys_and_name() -> None:
    """client_id and redirect_uri are required, and the provider name must match the pattern."""
    found = problems('[providers."bad.name"]\nissuer = "https://idp.example.nl/o"\n')
    assert found == [
        "providers.bad.name: a provider name must match [A-Za-z0-9_-]{1,64}",
        "providers.bad.name.redirect_uri: required",
        "providers.bad.name.client_id: required",
    ]


def test_scopes_must_be_distinct_words() -> None:
    """Scopes are strings without whitespace, not empty, not repeated."""
    found = problems(PROVIDER + 'scopes = ["openid", "a b", "", 3, "openid"]\n')
    assert [p.split(":")[0] for p in found] == [
        "providers.p.scopes[3]",
        "providers.p.scopes[1]",
        "providers.p.scopes[2]",
        "providers.p.scopes[3]",
    ]
    assert found[0].endswith("expected a string, got integer")


def test_access_token_from_id_token_claim() -> None:
    """ "id_token_claim:NAME" serves that claim of the ID token."""
    text = PROVIDER + 'access_token_from = "id_token_claim:permission_management"\n'
    source = parse(text).providers["p"].access_token_from
    assert (source.kind, source.claim) == ("id_token_claim", "permission_management")


def test_id_token_claim_needs_openid_scope() -> None:
    """An access token taken from the ID token requires the openid scope."""
    text = PROVIDER + 'scopes = ["profile"]\naccess_token_from = "id_token_claim:x"\n'
    assert problems(text) == [
        "providers.p.access_token_from: 'id_token_claim:x' needs \"openid\" in scopes"
        " for an ID token"
    ]


@pytest.mark.parametrize("value", ["id_token_claim", "id_token_claim:", "token", ""])
def test_access_token_from_rejects_other_values(value: str) -> None:
    """Only "token_response" and "id_token_claim:NAME" with a non-empty NAME are accepted."""
    [problem] = problems(PROVIDER + f'access_token_from = "{value}"\n')
    assert problem.startswith('providers.p.access_token_from: expected "token_response" or')


@pytest.mark.parametrize(
    ("extra", "auth"),
    [
        ("", "none"),
        ('client_secret_file = "/nonexistent/p.secret"', "client_secret_basic"),
        (
            'client_secret_file = "p.secret"\nclient_auth = "client_secret_post"',
            "client_secret_post",
        ),
        ('client_auth = "none"', "none"),
    ],
)
def test_client_auth_defaults_from_the_secret_file(extra: str, auth: str) -> None:
    """Without a secret file the client is public, with one it uses basic auth; it is not read."""
    assert parse(PROVIDER + extra + "\n").providers["p"].client_auth == auth


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ('client_auth = "client_secret_basic"', '"client_secret_basic" needs client_secret_file'),
        ('client_auth = "client_secret_post"', '"client_secret_post" needs client_secret_file'),
        ('client_auth = "none"\nclient_secret_file = "s"', "yet client_secret_file is set"),
        ('client_auth = "private_key_jwt"', "expected one of none, client_secret_basic"),
    ],
)
def test_client_auth_and_secret_file_must_agree(extra: str, reason: str) -> None:
    """Secret-based client auth needs a secret file, and "none" must not come with one."""
    [problem] = problems(PROVIDER + extra + "\n")
    assert problem.startswith("providers.p.client_auth: ")
    assert reason in problem


def test_clients_are_parsed() -> None:
    """Clients keep their identities, grant patterns and admin flag."""
    token = "a" * 64
    config = parse(
        PROVIDER
        + f"""
        [[clients]]
        name = "billing"
        unix_user = "billing"
        unix_group = "svc"
        grants = ["p/*", "*/alice", "p/bob@example.nl"]
        [[clients]]
        name = "ops"
        token_sha256 = "{token}"
        admin = true
        """
    )
    billing, ops = config.clients
    assert billing.unix_user == "billing"
    assert billing.unix_group == "svc"
    assert billing.grants == ("p/*", "*/alice", "p/bob@example.nl")
    assert billing.admin is False
    assert ops.token_sha256 == token
    assert ops.admin is True


def test_client_mistakes_are_reported_per_client() -> None:
    """Names are unique, an identity is needed, tokens are sha256 hex, grants are P/U globs."""
    found = problems(
        PROVIDER
        + f"""
        [[clients]]
        name = "a"
        [[clients]]
        name = "a"
        token_sha256 = "{"A" * 64}"
        unix_uid = -1
        grants = ["p", "p/a/b", "nope/alice", "n*/alice"]
        """
    )
    assert found == [
        "clients[0]: needs unix_user, unix_uid, unix_group or token_sha256",
        "clients[1].name: duplicate client name 'a' (also clients[0])",
        "clients[1].unix_uid: must not be negative, got -1",
        "clients[1].token_sha256: must be 64 lowercase hex characters (sha256 of the token)",
        'clients[1].grants[0]: \'p\' must be "PROVIDER/USER" with exactly one "/"',
        'clients[1].grants[1]: \'p/a/b\' must be "PROVIDER/USER" with exactly one "/"',
        "clients[1].grants[2]: 'nope/alice' names no configured provider",
    ]


def test_clients_must_be_an_array_of_tables() -> None:
    """`clients` written as a table or holding non-tables is refused."""
    assert problems("[clients]\nname = 'a'\n") == [
        "clients: expected an array of tables ([[clients]]), got table"
    ]
    assert problems("clients = ['a']\n") == ["clients[0]: expected a table, got string"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist gives a ConfigError naming the path."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["file not found"]


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    """A path that cannot be read as a file gives a ConfigError, not an OSError."""
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path)


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """Broken TOML gives a ConfigError that says which line is wrong."""
    path = tmp_path / "config.toml"
    path.write_text('[server]\nsocket = "/run/x.sock"\nmetrics 127.0.0.1:9464\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith("TOML syntax error: ")
    assert "line 3" in problem


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 gives a ConfigError."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


def test_resolve_config_path_precedence() -> None:
    """The -c value wins over $TOKEN_BROKER_CONFIG, which wins over the default path."""
    env = {CONFIG_ENV: "/env/config.toml"}
    assert resolve_config_path("/cli/config.toml", env) == Path("/cli/config.toml")
    assert resolve_config_path(None, env) == Path("/env/config.toml")
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH
    assert resolve_config_path(None, {CONFIG_ENV: ""}) == DEFAULT_CONFIG_PATH
    assert Path("/etc/token-broker/config.toml") == DEFAULT_CONFIG_PATH


# -- [readiness] -----------------------------------------------------------------------------------


def test_required_grants_name_configured_providers() -> None:
    """[readiness] required_grants lists exact PROVIDER/USER names of configured providers."""
    config = parse(PROVIDER + '\n[readiness]\nrequired_grants = ["p/svc", "p/batch@x"]\n')
    assert config.readiness.required_grants == ("p/svc", "p/batch@x")
    assert parse(PROVIDER).readiness.required_grants == ()


def test_required_grants_problems_are_all_reported() -> None:
    """A pattern, a malformed name, an unknown provider and a repeat are each named."""
    found = problems(
        PROVIDER + '\n[readiness]\nrequired_grants = ["p/*", "nouser", "q/svc", "p/a", "p/a"]\n'
    )
    assert found == [
        "readiness.required_grants[0]: 'p/*' must be \"PROVIDER/USER\" (no patterns)",
        "readiness.required_grants[1]: 'nouser' must be \"PROVIDER/USER\" (no patterns)",
        "readiness.required_grants[2]: 'q/svc' names no configured provider",
        "readiness.required_grants[4]: 'p/a' is listed twice",
    ]


# -- [[sinks]] -------------------------------------------------------------------------------------


def test_sinks_are_parsed_with_their_defaults_and_accounts_resolved() -> None:
    """A sink names one grant and a path (relative to the config's directory); format
    defaults to token and mode to 0600; owner and group are names or numbers, names looked up."""
    root = pwd.getpwuid(0)
    config = parse(
        PROVIDER
        + f"""
        [[sinks]]
        grant = "p/alice"
        path = "sinks/alice.token"

        [[sinks]]
        grant = "p/bob"
        path = "/run/billing/bob.json"
        format = "json"
        mode = "0640"
        owner = "{root.pw_name}"
        group = "{grp.getgrgid(0).gr_name}"

        [[sinks]]
        grant = "p/carol"
        path = "/run/carol/header"
        format = "header"
        owner = 4321
        group = "8765"
        """
    )
    assert config.sinks == (
        SinkConfig("p/alice", BASE / "sinks/alice.token", "token", 0o600, None, None),
        SinkConfig("p/bob", Path("/run/billing/bob.json"), "json", 0o640, root.pw_uid, 0),
        SinkConfig("p/carol", Path("/run/carol/header"), "header", 0o600, 4321, 8765),
    )
    assert (config.sinks[1].provider, config.sinks[1].user) == ("p", "bob")
    assert parse(PROVIDER).sinks == ()


def test_a_nul_character_anywhere_is_a_problem_named_by_its_key() -> None:
    """A NUL in a path, a name or a URL (which the operating system's calls refuse with an
    exception) is reported with its key, with every other problem, in values and in keys."""
    found = problems(
        """
        sinks = [
          {grant = "p/alice", path = "/a", owner = "x\\u0000", group = "\\u0000"},
          {grant = "p/alice", path = "/b", owner = "", group = ""},
        ]
        [server]
        socket = "/run/a\\u0000b.sock"
        [store]
        key_file = "/etc/keys\\u0000"
        [[clients]]
        name = "c"
        unix_user = "no\\u0000body"
        grants = ["p/*"]
        "col\\u0000our" = 1
        """
        + PROVIDER
    )
    assert found == [
        "sinks[0].owner: contains a NUL character (\\u0000)",
        "sinks[0].group: contains a NUL character (\\u0000)",
        "server.socket: contains a NUL character (\\u0000)",
        "store.key_file: contains a NUL character (\\u0000)",
        "clients[0].unix_user: contains a NUL character (\\u0000)",
        "clients[0].col?our: the key contains a NUL character",
        "clients[0].col\ufffdour: unknown key",
        "sinks[0].owner: no user named 'x\ufffd' on this host",
        "sinks[0].group: no group named '\ufffd' on this host",
        "sinks[1].owner: must not be empty: give a user name or number, or leave the key out",
        "sinks[1].group: must not be empty: give a group name or number, or leave the key out",
    ]


def test_every_sink_problem_is_reported_at_once() -> None:
    """A pattern, an unknown provider, a missing or repeated path, a format, a mode that lets
    others read, a malformed mode, an owner and a group that do not exist, an unknown key and
    a sink that is not a table are each named with its key."""
    found = problems(
        """
        sinks = [
          {grant = "p/*", path = "/a", format = "yaml", mode = "0644"},
          {grant = "q/alice", path = "/a", mode = "64O", owner = "no-such-user-here"},
          {grant = "p/alice", group = "no-such-group-here", colour = "blue"},
          {grant = "p/alice", path = "/b", owner = -1},
          "p/alice",
        ]
        """
        + PROVIDER
    )
    assert found == [
        "sinks[0].grant: 'p/*' must be \"PROVIDER/USER\" (one grant, no patterns)",
        "sinks[0].format: expected one of token, json, header, got 'yaml'",
        "sinks[0].mode: '0644' must give others no access (use group), nor exceed 0770",
        "sinks[1].grant: 'q/alice' names no configured provider",
        "sinks[1].path: '/a' is also the path of sinks[0]",
        "sinks[1].mode: expected 3 or 4 octal digits such as \"0640\", got '64O'",
        "sinks[1].owner: no user named 'no-such-user-here' on this host",
        "sinks[2].colour: unknown key",
        "sinks[2].path: required",
        "sinks[2].group: no group named 'no-such-group-here' on this host",
        "sinks[3].owner: a user id must be from 0 to 4294967294, got -1",
        "sinks[4]: expected a table, got string",
    ]
