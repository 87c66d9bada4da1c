"""One broker installation for a benchmark: a directory, a config, a keyring and a store.

The daemon is the real `token-broker serve` subprocess (`tests.daemon.DaemonProcess`) with
what a production install has switched on: access control through `[[clients]]`, the
metrics listener on loopback, and logging at its default level (JSON lines, info). Its
stderr goes to the benchmark's log directory and is checked for leaked token values when
it stops.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.identity import ClientIdentity
from bench.tokens import assert_no_tokens_in
from broker.crypto import Keyring, write_keyring
from tests.daemon import DaemonProcess, Home, free_port, running_daemon

PROVIDER = "bench"
# A loopback port where nothing listens: the provider of benchmarks that must never refresh.
NO_IDP = "http://127.0.0.1:9"


@dataclass(frozen=True, slots=True)
class Workspace:
    """A benchmark's temporary directory: installations in it, daemon logs in `logs`."""

    root: Path
    logs: Path

    def directory(self, name: str) -> Path:
        """A fresh subdirectory (an installation, or a client's output)."""
        path = self.root / name
        # Traversable, not listable: a client under another uid reaches the socket inside.
        path.mkdir(mode=0o711)
        return path


@contextlib.contextmanager
def workspace(log_dir: Path | None, keep: bool = False) -> Iterator[Workspace]:
    """A directory under $TMPDIR (short enough for socket paths), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    # Traversable by others, so a client under another uid reaches the sockets inside.
    root.chmod(0o711)
    logs = log_dir or root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        yield Workspace(root, logs)
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class Installation:
    """The paths of one broker and the keyring that seals its store."""

    home: Home
    store_url: str
    keyring: Keyring
    metrics_port: int

    @property
    def socket(self) -> Path:
        """The API socket."""
        return self.home.socket

    def write_config(
        self,
        *,
        client: ClientIdentity,
        idp: str = NO_IDP,
        max_concurrency: int = 8,
    ) -> None:
        """The config: the benchmark provider at `idp`, the client's entry, metrics on."""
        self.home.config.write_text(
            f"""
[server]
socket = {json.dumps(str(self.socket))}
socket_mode = "0660"
callback = ""
metrics = "127.0.0.1:{self.metrics_port}"

[store]
url = {json.dumps(self.store_url)}
key_file = {json.dumps(str(self.home.key_file))}

[refresh]
max_concurrency = {max_concurrency}

[providers.{PROVIDER}]
authorization_endpoint = "{idp}/authorize"
token_endpoint = "{idp}/token"
client_id = "bench"
scopes = ["profile"]
redirect_uri = "http://127.0.0.1:8000/oauth-callback/"
{client.clients_toml([f"{PROVIDER}/*"])}"""
        )


def install(directory: Path, store_url: str | None = None) -> Installation:
    """A new installation in `directory`: a keyring, and a SQLite store unless one is given."""
    home = Home(directory)
    keyring = Keyring.generate(datetime.now(UTC))
    write_keyring(home.key_file, keyring, replace=False)
    return Installation(home, store_url or home.store_url, keyring, free_port())


@contextlib.contextmanager
def daemon(
    installation: Installation, logs: Path, name: str, *, wait: bool = True
) -> Iterator[DaemonProcess]:
    """The running daemon (serving, unless `wait` is false); stopped by pid, log checked."""
    with running_daemon(installation.home, logs, name=name, wait=wait) as process:
        yield process
    assert_no_tokens_in(process.log_path)
