"""TOML configuration -> frozen, validated dataclasses; every problem is reported at once.

Parsing never stops at the first mistake: the `Table` getters record `key.path: reason`
problems and return a placeholder, and `parse_config` raises one `ConfigError` at the end.
Nothing here touches the network or reads secret files; paths are only resolved.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast, get_args
from urllib.parse import urlsplit

from broker.errors import ConfigError
from broker.model import PROVIDER_RE, USER_RE
from broker.tomltable import Table, parse_duration, table_keys, type_name

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "AccessTokenSource",
    "ClientAuth",
    "ClientConfig",
    "Config",
    "Listen",
    "ProviderConfig",
    "ReadinessConfig",
    "RefreshConfig",
    "ServerConfig",
    "SinkConfig",
    "SinkFormat",
    "StoreConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "resolve_config_path",
]

DEFAULT_CONFIG_PATH = Path("/etc/token-broker/config.toml")
CONFIG_ENV = "TOKEN_BROKER_CONFIG"

ClientAuth = Literal["none", "client_secret_basic", "client_secret_post"]
_CLIENT_AUTHS: tuple[str, ...] = get_args(ClientAuth)
_URL_KEYS = (
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "revocation_endpoint",
    "jwks_uri",
    "userinfo_endpoint",
    "device_authorization_endpoint",
    "introspection_endpoint",
)
_IDENTITY_KEYS = ("unix_user", "unix_uid", "unix_group", "token_sha256")
SinkFormat = Literal["token", "json", "header"]
_SINK_FORMATS: tuple[str, ...] = get_args(SinkFormat)
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown
DEFAULT_SINK_MODE = 0o600
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class Listen:
    """A TCP address to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the daemon listens."""

    socket: Path = Path("/run/token-broker/broker.sock")
    socket_mode: int = 0o660
    tcp: Listen | None = None
    callback: Listen | None = Listen("127.0.0.1", 8000)
    metrics: Listen | None = Listen("127.0.0.1", 9464)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where grants are kept, the keyring that seals them, and how a fleet shares them."""

    url: str = "sqlite:////var/lib/token-broker/broker.db"
    key_file: Path = Path("/etc/token-broker/keys")
    password_file: Path | None = None  # PostgreSQL: else PGPASSWORD or ~/.pgpass
    pool_size: int = 10  # PostgreSQL connections per broker
    # A broker whose heartbeat is older than this is dead: its refreshes are recovered.
    node_timeout: timedelta = timedelta(seconds=10)

    @property
    def postgresql(self) -> bool:
        """Whether the store is PostgreSQL (a fleet may share it)."""
        return self.url.startswith("postgresql://")


@dataclass(frozen=True, slots=True)
class RefreshConfig:
    """When access tokens are refreshed, and how many refreshes run at once per provider."""

    lifetime_fraction: float = 0.75
    min_margin: timedelta = timedelta(seconds=60)
    jitter: float = 0.1
    max_concurrency: int = 8


@dataclass(frozen=True, slots=True)
class AccessTokenSource:
    """Where the served access token comes from: the token response, or an ID token claim."""

    kind: Literal["token_response", "id_token_claim"] = "token_response"
    claim: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One OAuth 2.0 / OIDC provider; endpoints left None come from discovery."""

    name: str
    issuer: str | None
    authorization_endpoint: str | None
    token_endpoint: str | None
    revocation_endpoint: str | None
    jwks_uri: str | None
    userinfo_endpoint: str | None
    client_id: str
    client_secret_file: Path | None
    client_auth: ClientAuth
    scopes: tuple[str, ...]
    redirect_uri: str
    access_token_from: AccessTokenSource
    refresh_grace: timedelta
    rotates_refresh_tokens: bool
    device_authorization_endpoint: str | None = None
    introspection_endpoint: str | None = None
    git_username: str = "oauth2"  # the username `token-broker git-credential` answers with


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A local service: how it is recognised and which grants it may fetch."""

    name: str
    unix_user: str | None
    unix_uid: int | None
    unix_group: str | None
    token_sha256: str | None
    grants: tuple[str, ...]
    admin: bool


@dataclass(frozen=True, slots=True)
class ReadinessConfig:
    """What /readyz demands beyond a working store, keyring and refresh loop."""

    # PROVIDER/USER grants that must be usable (active with a live access token, or
    # refreshable); while one is not, /readyz answers 503 and names it.
    required_grants: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """A file kept holding one grant's current access token, for consumers that read files."""

    grant: str  # PROVIDER/USER, exactly
    path: Path
    format: SinkFormat = "token"
    mode: int = DEFAULT_SINK_MODE
    owner: int | None = None  # uid; None: the daemon's
    group: int | None = None  # gid; None: the daemon's (or the directory's, when setgid)

    @property
    def provider(self) -> str:
        """The PROVIDER of the grant."""
        return self.grant.partition("/")[0]

    @property
    def user(self) -> str:
        """The USER of the grant."""
        return self.grant.partition("/")[2]


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration; `source` names the file it came from."""

    source: str
    server: ServerConfig
    store: StoreConfig
    refresh: RefreshConfig
    providers: Mapping[str, ProviderConfig]
    clients: tuple[ClientConfig, ...]
    readiness: ReadinessConfig = ReadinessConfig()
    sinks: tuple[SinkConfig, ...] = ()


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str]) -> Path:
    """The config path: `-c`, else `$TOKEN_BROKER_CONFIG`, else the default."""
    if cli_value:
        return Path(cli_value)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read, parse and validate the TOML file at `path`."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["the file is not valid UTF-8"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [f"TOML syntax error: {e}"]) from None
    return parse_config(data, source=str(path), base_dir=path.absolute().parent)


def parse_config(data: Mapping[str, Any], *, source: str, base_dir: Path) -> Config:
    """Validate parsed TOML; relative paths are resolved against `base_dir`."""
    problems: list[str] = []
    base_dir = base_dir.absolute()
    data = _without_nul(data, "", problems)
    sections = ("server", "store", "refresh", "providers", "clients", "readiness", "sinks")
    root = Table(data, "", problems, sections)
    server = _parse_server(root.section("server", ServerConfig), base_dir)
    store = _parse_store(root.section("store", StoreConfig), base_dir)
    refresh = _parse_refresh(root.section("refresh", RefreshConfig))
    providers: dict[str, ProviderConfig] = {}
    for name, table in root.table("providers").items():
        if isinstance(table, dict):
            keys = table_keys(ProviderConfig, exclude="name")
            providers[name] = _parse_provider(
                name, Table(table, f"providers.{name}", problems, keys), base_dir
            )
        else:
            problems.append(f"providers.{name}: expected a table, got {type_name(table)}")
    clients = _parse_clients(root, providers)
    readiness = _parse_readiness(root.section("readiness", ReadinessConfig), providers)
    sinks = _parse_sinks(root, providers, base_dir)
    if problems:
        raise ConfigError(source, problems)
    return Config(
        source, server, store, refresh, MappingProxyType(providers), clients, readiness, sinks
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_listen(text: str) -> Listen:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f'expected "HOST:PORT" or "[IPV6]:PORT", got {text!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'write an IPv6 address in brackets, such as "[::1]:{port}"')
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port must be a number from 1 to 65535, got {port!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address or localhost") from None
    return Listen(host, int(port))


def _listen(t: Table, key: str, default: Listen | None, *, loopback: bool = False) -> Listen | None:
    text = t.string(key)
    if text is None:
        return default
    if text == "":
        return None  # "" switches the listener off
    try:
        listen = _parse_listen(text)
    except ValueError as e:
        t.problem(key, str(e))
        return default
    if loopback and not _is_loopback(listen.host):
        reason = "must be a loopback address, because bearer tokens travel in clear"
        t.problem(key, f"{text!r} {reason}")
    return listen


def _check_url(t: Table, key: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
    except ValueError:  # e.g. an unclosed "[" in the host
        scheme, host = "", ""
    if not host or not (scheme == "https" or (scheme == "http" and _is_loopback(host))):
        t.problem(key, f"must be an https URL (http only for a loopback host), got {url!r}")


def _parse_server(t: Table, base_dir: Path) -> ServerConfig:
    d = ServerConfig()
    mode = d.socket_mode
    text = t.string("socket_mode", 'a string of octal digits such as "0660"')
    if text is not None and not re.fullmatch(r"[0-7]{3,4}", text):
        t.problem("socket_mode", f'expected 3 or 4 octal digits such as "0660", got {text!r}')
    elif text is not None:
        mode = int(text, 8)
        if mode > 0o777 or mode & 0o002:
            t.problem("socket_mode", f"{text!r} must not exceed 0777 nor let others write")
    return ServerConfig(
        socket=t.path("socket", base_dir) or d.socket,
        socket_mode=mode,
        tcp=_listen(t, "tcp", d.tcp, loopback=True),
        callback=_listen(t, "callback", d.callback),
        metrics=_listen(t, "metrics", d.metrics),
    )


def _parse_store(t: Table, base_dir: Path) -> StoreConfig:
    d = StoreConfig()
    url = t.nonempty("url") or d.url
    if url.startswith("sqlite:///") and url != "sqlite:///":
        url = f"sqlite:///{base_dir / url.removeprefix('sqlite:///')}"
    elif url.startswith(("postgresql://", "postgresql+asyncpg://")) and url.partition("://")[2]:
        url = "postgresql://" + url.partition("://")[2]
    else:
        t.problem("url", "expected sqlite:///PATH, postgresql://... or postgresql+asyncpg://...")
    password_file = t.path("password_file", base_dir)  # read by PostgreSQL stores only
    pool_size = t.integer("pool_size")
    if pool_size is not None and not 1 <= pool_size <= 100:
        t.problem("pool_size", f"must be from 1 to 100, got {pool_size}")
    node_timeout = t.duration("node_timeout", d.node_timeout)
    if not timedelta(seconds=3) <= node_timeout <= timedelta(minutes=5):
        t.problem("node_timeout", "must be from 3s to 5m")
    return StoreConfig(
        url=url,
        key_file=t.path("key_file", base_dir) or d.key_file,
        password_file=password_file,
        pool_size=d.pool_size if pool_size is None else pool_size,
        node_timeout=node_timeout,
    )


def _parse_refresh(t: Table) -> RefreshConfig:
    d = RefreshConfig()
    fraction = t.number("lifetime_fraction", d.lifetime_fraction)
    jitter = t.number("jitter", d.jitter)
    concurrency = t.integer("max_concurrency")
    if not 0 < fraction < 1:
        t.problem("lifetime_fraction", f"must be greater than 0 and less than 1, got {fraction}")
    if not 0 <= jitter < 0.5:
        t.problem("jitter", f"must be at least 0 and less than 0.5, got {jitter}")
    if concurrency is not None and not 1 <= concurrency <= 1000:
        t.problem("max_concurrency", f"must be from 1 to 1000, got {concurrency}")
    return RefreshConfig(
        lifetime_fraction=fraction,
        min_margin=t.duration("min_margin", d.min_margin),
        jitter=jitter,
        max_concurrency=d.max_concurrency if concurrency is None else concurrency,
    )


def _parse_provider(name: str, t: Table, base_dir: Path) -> ProviderConfig:
    if not PROVIDER_RE.fullmatch(name):
        t.problems.append(f"{t.prefix}: a provider name must match {PROVIDER_RE.pattern}")
    urls = {key: t.nonempty(key) for key in _URL_KEYS}
    for key, url in urls.items():
        if url is not None:
            _check_url(t, key, url)
    for key in ("authorization_endpoint", "token_endpoint"):
        if urls["issuer"] is None and urls[key] is None and key not in t.data:
            t.problem(key, 'required when there is no "issuer" (set "issuer" for OIDC discovery)')
    redirect_uri = t.nonempty("redirect_uri", required=True) or ""
    if redirect_uri:
        _check_url(t, "redirect_uri", redirect_uri)
    scopes = t.strings("scopes")
    scopes = ("openid",) if scopes is None else scopes
    for i, scope in enumerate(scopes):
        if not scope or any(c.isspace() for c in scope) or scope in scopes[:i]:
            t.problem(f"scopes[{i}]", f"{scope!r} must be non-empty, without whitespace, unique")
    secret_file = t.path("client_secret_file", base_dir)
    return ProviderConfig(
        name=name,
        issuer=urls["issuer"],
        authorization_endpoint=urls["authorization_endpoint"],
        token_endpoint=urls["token_endpoint"],
        revocation_endpoint=urls["revocation_endpoint"],
        jwks_uri=urls["jwks_uri"],
        userinfo_endpoint=urls["userinfo_endpoint"],
        client_id=t.nonempty("client_id", required=True) or "",
        client_secret_file=secret_file,
        client_auth=_client_auth(t, secret_file),
        scopes=scopes,
        redirect_uri=redirect_uri,
        access_token_from=_token_source(t, scopes),
        refresh_grace=t.duration("refresh_grace", timedelta(0)),
        rotates_refresh_tokens=t.flag("rotates_refresh_tokens", True),
        device_authorization_endpoint=urls["device_authorization_endpoint"],
        introspection_endpoint=urls["introspection_endpoint"],
        git_username=_git_username(t),
    )


def _git_username(t: Table) -> str:
    name = t.string("git_username")
    if name is None:
        return "oauth2"
    if not name or any(c.isspace() or c in "=\0" for c in name) or len(name) > 128:
        t.problem(
            "git_username", f"must be 1 to 128 characters without whitespace or =, got {name!r}"
        )
        return "oauth2"
    return name


def _token_source(t: Table, scopes: tuple[str, ...]) -> AccessTokenSource:
    text = t.string("access_token_from")
    kind, _, claim = (text or "").partition(":")
    if kind == "id_token_claim" and claim:
        if "openid" not in scopes:
            t.problem("access_token_from", f'{text!r} needs "openid" in scopes for an ID token')
        return AccessTokenSource("id_token_claim", claim)
    if text not in (None, "token_response"):
        expected = '"token_response" or "id_token_claim:CLAIM"'
        t.problem("access_token_from", f"expected {expected}, got {text!r}")
    return AccessTokenSource()


def _client_auth(t: Table, secret_file: Path | None) -> ClientAuth:
    auth = t.string("client_auth") or ("client_secret_basic" if secret_file else "none")
    if auth not in _CLIENT_AUTHS:
        t.problem("client_auth", f"expected one of {', '.join(_CLIENT_AUTHS)}, got {auth!r}")
    elif auth != "none" and secret_file is None:
        t.problem("client_auth", f'"{auth}" needs client_secret_file')
    elif auth == "none" and secret_file is not None:
        t.problem("client_auth", '"none" sends no secret, yet client_secret_file is set')
    return cast("ClientAuth", auth)


def _parse_clients(
    root: Table, providers: Mapping[str, ProviderConfig]
) -> tuple[ClientConfig, ...]:
    items = root.array("clients", "an array of tables ([[clients]])")
    clients: list[ClientConfig] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            root.problem(f"clients[{i}]", f"expected a table, got {type_name(item)}")
            continue
        t = Table(item, f"clients[{i}]", root.problems, table_keys(ClientConfig))
        name = t.nonempty("name", required=True) or ""
        if name in seen:
            t.problem("name", f"duplicate client name {name!r} (also clients[{seen[name]}])")
        elif name:
            seen[name] = i
        user, group, token = (
            t.nonempty("unix_user"),
            t.nonempty("unix_group"),
            t.nonempty("token_sha256"),
        )
        uid = t.integer("unix_uid")
        if uid is not None and uid < 0:
            t.problem("unix_uid", f"must not be negative, got {uid}")
        if token is not None and not _SHA256_RE.fullmatch(token):
            t.problem("token_sha256", "must be 64 lowercase hex characters (sha256 of the token)")
        if not any(key in item for key in _IDENTITY_KEYS):
            root.problem(f"clients[{i}]", "needs unix_user, unix_uid, unix_group or token_sha256")
        grants = t.strings("grants") or ()
        for j, pattern in enumerate(grants):
            provider = pattern.partition("/")[0]
            if pattern.count("/") != 1:
                t.problem(
                    f"grants[{j}]", f'{pattern!r} must be "PROVIDER/USER" with exactly one "/"'
                )
            elif not _GLOB_CHARS & set(provider) and provider not in providers:
                t.problem(f"grants[{j}]", f"{pattern!r} names no configured provider")
        clients.append(ClientConfig(name, user, uid, group, token, grants, t.flag("admin", False)))
    return tuple(clients)


def _parse_readiness(t: Table, providers: Mapping[str, ProviderConfig]) -> ReadinessConfig:
    names = t.strings("required_grants") or ()
    for i, name in enumerate(names):
        provider, sep, user = name.partition("/")
        if not sep or not PROVIDER_RE.fullmatch(provider) or not USER_RE.fullmatch(user):
            t.problem(f"required_grants[{i}]", f'{name!r} must be "PROVIDER/USER" (no patterns)')
        elif provider not in providers:
            t.problem(f"required_grants[{i}]", f"{name!r} names no configured provider")
        elif name in names[:i]:
            t.problem(f"required_grants[{i}]", f"{name!r} is listed twice")
    return ReadinessConfig(required_grants=names)


def _parse_sinks(
    root: Table, providers: Mapping[str, ProviderConfig], base_dir: Path
) -> tuple[SinkConfig, ...]:
    items = root.array("sinks", "an array of tables ([[sinks]])")
    sinks: list[SinkConfig] = []
    paths: dict[Path, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            root.problem(f"sinks[{i}]", f"expected a table, got {type_name(item)}")
            continue
        t = Table(item, f"sinks[{i}]", root.problems, table_keys(SinkConfig))
        grant = t.nonempty("grant", required=True) or ""
        provider, sep, user = grant.partition("/")
        if grant and (
            not sep or not PROVIDER_RE.fullmatch(provider) or not USER_RE.fullmatch(user)
        ):
            t.problem("grant", f'{grant!r} must be "PROVIDER/USER" (one grant, no patterns)')
        elif grant and provider not in providers:
            t.problem("grant", f"{grant!r} names no configured provider")
        path = t.path("path", base_dir)
        if path is None and "path" not in item:
            t.problem("path", "required")
        elif path is not None and path in paths:
            t.problem("path", f"{str(path)!r} is also the path of sinks[{paths[path]}]")
        elif path is not None:
            paths[path] = i
        fmt = t.string("format") or "token"
        if fmt not in _SINK_FORMATS:
            t.problem("format", f"expected one of {', '.join(_SINK_FORMATS)}, got {fmt!r}")
        sinks.append(
            SinkConfig(
                grant=grant,
                path=path or Path(),
                format=cast("SinkFormat", fmt),
                mode=_sink_mode(t),
                owner=_account(t, "owner", _uid, "user"),
                group=_account(t, "group", _gid, "group"),
            )
        )
    return tuple(sinks)


def _sink_mode(t: Table) -> int:
    text = t.string("mode", 'a string of octal digits such as "0640"')
    if text is None:
        return DEFAULT_SINK_MODE
    if not re.fullmatch(r"[0-7]{3,4}", text):
        t.problem("mode", f'expected 3 or 4 octal digits such as "0640", got {text!r}')
        return DEFAULT_SINK_MODE
    mode = int(text, 8)
    if mode > 0o777 or mode & 0o007:
        # Anyone on the host could read the token: give access through owner or group.
        t.problem("mode", f"{text!r} must give others no access (use group), nor exceed 0770")
    return mode


def _without_nul(value: Any, key: str, problems: list[str]) -> Any:
    """`value` with every NUL character (which no path, name or URL may hold, and which the
    operating system's calls refuse) reported under its key and replaced by U+FFFD."""
    if isinstance(value, str):
        if "\0" in value:
            problems.append(f"{key or '(top level)'}: contains a NUL character (\\u0000)")
            return value.replace("\0", "\ufffd")
        return value
    if isinstance(value, Mapping):
        out = {}
        for name, item in value.items():
            child = f"{key}.{name}" if key else str(name)
            if "\0" in name:
                problems.append(f"{child.replace(chr(0), '?')}: the key contains a NUL character")
            out[name.replace("\0", "\ufffd")] = _without_nul(item, child, problems)
        return out
    if isinstance(value, list):
        return [_without_nul(item, f"{key}[{i}]", problems) for i, item in enumerate(value)]
    return value


def _account(t: Table, key: str, lookup: Callable[[str], int], kind: str) -> int | None:
    """A user or group given by name (which must exist) or by number (taken as it is)."""
    value = t.data.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= _MAX_ID:
            t.problem(key, f"a {kind} id must be from 0 to {_MAX_ID}, got {value}")
            return None
        return value
    if not isinstance(value, str) or not value:
        t.problem(
            key,
            f"must not be empty: give a {kind} name or number, or leave the key out"
            if value == ""
            else f"expected a {kind} name or number, got {type_name(value)}",
        )
        return None
    try:
        return lookup(value)
    except (KeyError, ValueError):  # ValueError: a name the C library cannot take
        t.problem(key, f"no {kind} named {value!r} on this host")
        return None


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid
