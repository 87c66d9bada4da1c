"""`make demo`: a local django-oauth-toolkit identity provider, the daemon, a headless login.

Starts the test identity provider and the daemon on embedded defaults under var/demo/, logs
the demo user in through the provider's real login and consent forms, fetches the access token
over the Unix socket with curl, checks it at the provider's userinfo endpoint, prints what
happened, then shows the daemon's log until Ctrl-C, which stops everything it started.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from broker.client import BrokerClient
from tests.idp import login, start_django_idp

ROOT = Path("var/demo").absolute()  # the provider runs in its own directory: no relative paths
USER, PASSWORD = "alice", "alice-password"
PROVIDER = "techniek"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def say(label: str, text: str) -> None:
    """One readable line of the demo's story."""
    print(f"  {label:<10} {text}", flush=True)


def masked(token: str) -> str:
    """Enough of a token to recognise it, not enough to use it."""
    return f"{token[:4]}… ({len(token)} characters)"


def write_config(issuer: str, callback: int, metrics: int) -> Path:
    """The demo's config: the quick-start defaults plus the local provider."""
    config = ROOT / "config.toml"
    config.write_text(
        f"""# Written by `make demo`.
[server]
socket = "broker.sock"
socket_mode = "0600"
callback = "127.0.0.1:{callback}"
metrics = "127.0.0.1:{metrics}"

[store]
url = "sqlite:///broker.db"
key_file = "keys"

[providers.{PROVIDER}]
issuer = "{issuer}"
client_id = "broker-test"
scopes = ["openid", "profile", "FGO", "FGOWS"]
redirect_uri = "http://127.0.0.1:{callback}/oauth-callback/"
"""
    )
    return config


def wait_for(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the daemon's socket exists, or show why it did not start."""
    deadline = time.monotonic() + 20
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the daemon did not start; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def main() -> None:
    """Run the demo until Ctrl-C."""
    # Started from a background job, SIGINT arrives ignored (POSIX shells do that): take it
    # back, so Ctrl-C (or a test's SIGINT) always stops the demo.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    callback, metrics = free_port(), free_port()
    print("token-broker demo\n")
    idp = start_django_idp(ROOT, redirect_uris=[f"http://127.0.0.1:{callback}/oauth-callback/"])
    daemon: subprocess.Popen[bytes] | None = None
    log_path = ROOT / "broker.log"
    try:
        say("provider", f"django-oauth-toolkit at {idp.issuer} (users alice and bob)")
        config = write_config(idp.issuer, callback, metrics)
        base = [sys.executable, "-m", "broker", "-c", str(config)]
        subprocess.run([*base, "keys", "generate"], check=True, capture_output=True)
        with log_path.open("wb") as log:
            daemon = subprocess.Popen(
                [*base, "serve", "--log-format", "console"], stderr=log, stdout=log
            )
        sock = ROOT / "broker.sock"
        wait_for(sock, daemon, log_path)
        say("broker", f"serving on {sock}, metrics at http://127.0.0.1:{metrics}/metrics")

        client = BrokerClient(sock)
        started = client.call("POST", "/v1/logins", {"provider": PROVIDER, "user": USER})
        result = asyncio.run(login(started["authorize_url"], USER, PASSWORD, follow=True))
        status = client.call("GET", f"/v1/logins/{started['login_id']}")
        grant = client.call("GET", f"/v1/grants/{PROVIDER}/{USER}")
        say("login", f"{USER} signed in through the provider's login and consent forms")
        say(
            "",
            f"callback page: HTTP {result.callback_status}; login {status['state']}; "
            f"grant {PROVIDER}/{USER} stored encrypted (sub {grant['sub']})",
        )

        curl = [
            "curl",
            "-s",
            "--unix-socket",
            str(sock),
            f"http://broker/v1/tokens/{PROVIDER}/{USER}",
        ]
        token = json.loads(subprocess.run(curl, check=True, capture_output=True).stdout)
        say("token", " ".join(curl))
        say(
            "",
            f"-> {masked(token['access_token'])}, expires in {token['expires_in']} s, "
            f"scope {token['scope']!r}",
        )
        code, claims = idp.userinfo(token["access_token"])
        say("check", f"the provider's userinfo endpoint answers {code} for it: {claims}")
        print(
            f"\nTry, in another terminal:\n"
            f"  .venv/bin/token-broker -c {config} grants list\n"
            f"  .venv/bin/token-broker -c {config} token {PROVIDER} {USER}\n"
            f"  .venv/bin/token-broker -c {config} login {PROVIDER} bob --no-browser\n"
            f"    (open the printed URL and log in as bob / bob-password)\n"
            f"\nThe daemon's log follows. Ctrl-C stops the daemon and the provider.\n",
            flush=True,
        )
        follow(log_path)
    finally:
        # A second Ctrl-C while stopping must not leave either server behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        finally:
            idp.stop()
        print("\nstopped the daemon and the identity provider", flush=True)


def follow(path: Path) -> None:
    """Print the log as it grows until Ctrl-C or SIGTERM."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with path.open() as log:
        try:
            while True:
                line = log.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            return


if __name__ == "__main__":
    main()
