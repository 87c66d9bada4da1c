"""systemd integration: sd_notify against a real datagram socket, the watchdog, socket activation.

The daemon-level tests run a real `token-broker serve` subprocess with NOTIFY_SOCKET pointing at
a datagram socket the test reads, so what they see is what systemd would see; socket activation
runs the daemon under Debian's `systemd-socket-activate`, which passes a listening socket the
way systemd does (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.systemd import Notifier, activated_sockets, keepalive
from broker.tasks import Tasks
from tests.daemon import Home, clean_env, make_home, request, running_daemon

RECEIVE_TIMEOUT = 15.0  # seconds to wait for one expected notification


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next message as its KEY=VALUE fields, or None when none came in time."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = RECEIVE_TIMEOUT) -> dict[str, str]:
        """Read messages until one carries `key`; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def keys(self) -> list[str]:
        """Every key received so far, in order (STATUS and MONOTONIC_USEC left out)."""
        return [
            f"{k}={v}"
            for message in self.messages
            for k, v in message.items()
            if k not in ("STATUS", "MONOTONIC_USEC")
        ]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


# -- the protocol --------------------------------------------------------------------------------


def test_notifier_sends_each_state_as_one_datagram(notify_socket: NotifySocket) -> None:
    """READY, STATUS, RELOADING (with MONOTONIC_USEC), STOPPING and WATCHDOG arrive as sent."""
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path)})
    assert notifier.enabled
    assert notifier.ready("serving 2 grants")
    assert notifier.reloading()
    assert notifier.watchdog()
    assert notifier.stopping()
    messages = [notify_socket.receive(1.0) for _ in range(4)]
    assert messages[0] == {"READY": "1", "STATUS": "serving 2 grants"}
    assert messages[1] is not None
    assert messages[1]["RELOADING"] == "1"
    assert int(messages[1]["MONOTONIC_USEC"]) > 0
    assert messages[2] == {"WATCHDOG": "1"}
    assert messages[3] == {"STOPPING": "1", "STATUS": "stopping"}


def test_notifier_reaches_an_abstract_socket() -> None:
    """A NOTIFY_SOCKET starting with @ names a socket in the abstract namespace."""
    name = f"token-broker-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(1.0)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(100) == b"STATUS=hello"


def test_notifier_without_systemd_does_nothing(tmp_path: Path) -> None:
    """Without NOTIFY_SOCKET nothing is sent; a socket nobody listens on is not an error."""
    assert not Notifier({}).enabled
    assert not Notifier({}).ready("x")
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready("x")


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    environ: dict[str, str], interval: float | None
) -> None:
    """Pings go every WATCHDOG_USEC/2, and only when WATCHDOG_PID (if set) is this process."""
    assert Notifier(environ, pid=4242).watchdog_interval == interval


async def test_the_watchdog_is_fed_only_while_the_refresh_loop_is_healthy(
    notify_socket: NotifySocket,
) -> None:
    """A stalled refresh loop withholds WATCHDOG=1 and says why in STATUS; health resumes it."""
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "100000"})
    problem: list[str | None] = [None]
    task = Tasks().spawn(
        keepalive(notifier, health=lambda: problem[0], status=lambda: "serving 1 grants"),
        "keepalive",
    )

    async def read_for(seconds: float) -> None:
        # Read as systemd would: a full queue would make the notifier drop messages.
        for _ in range(round(seconds / 0.01)):
            while notify_socket.receive(0) is not None:
                pass
            await asyncio.sleep(0.01)

    try:
        await read_for(0.32)  # pings at 0, 0.05, 0.1, ... s
        problem[0] = "the schedule loop has not run for a while"
        await read_for(0.3)
        problem[0] = None
        await read_for(0.3)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await read_for(0.05)
    kinds = ["W" if "WATCHDOG" in m else "S:" + m["STATUS"] for m in notify_socket.messages]
    first_bad = kinds.index("S:unhealthy: the schedule loop has not run for a while")
    healed = kinds.index("S:serving 1 grants", first_bad)
    assert kinds[0] == "W"
    assert kinds[1] == "S:serving 1 grants"
    assert kinds[1:first_bad].count("W") >= 4
    # Six ticks while stalled: no ping until the tick that found it healthy again.
    assert kinds[healed - 1] == "W"
    assert "W" not in kinds[first_bad : healed - 1]
    assert kinds[healed + 1 :].count("W") >= 4


# -- the daemon ----------------------------------------------------------------------------------


def test_the_daemon_reports_ready_reload_watchdog_and_stopping_in_order(
    tmp_path: Path, log_dir: Path, notify_socket: NotifySocket
) -> None:
    """READY=1 once serving, WATCHDOG=1 pings, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1."""
    home = make_home(tmp_path)
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    with running_daemon(home, log_dir, env=env, wait=False) as daemon:
        ready = notify_socket.wait_for("READY")
        # READY came only once the API answers: the socket is up by then.
        assert request(home.socket, "GET", "/healthz").status == 200
        assert ready["STATUS"].startswith("serving 0 grants")
        notify_socket.wait_for("WATCHDOG")
        notify_socket.wait_for("WATCHDOG")
        os.kill(daemon.pid, signal.SIGHUP)
        reloading = notify_socket.wait_for("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notify_socket.wait_for("READY")["STATUS"].startswith("serving 0 grants")
        notify_socket.wait_for("WATCHDOG")
        daemon.terminate()
        notify_socket.wait_for("STOPPING")
    keys = notify_socket.keys()
    assert keys[0] == "READY=1"
    assert keys.index("RELOADING=1") < len(keys) - 1 - keys[::-1].index("READY=1")
    assert keys[-1] == "STOPPING=1"
    assert keys.count("WATCHDOG=1") >= 3
    assert keys.count("READY=1") == 2


def test_the_daemon_serves_on_a_socket_passed_by_socket_activation(
    tmp_path: Path, log_dir: Path
) -> None:
    """Under systemd-socket-activate the daemon serves on the passed socket and never unlinks it."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        if os.environ.get("TOKEN_BROKER_REQUIRE_TOOLS") == "1":
            pytest.fail("systemd-socket-activate is required (TOKEN_BROKER_REQUIRE_TOOLS=1)")
        pytest.skip("systemd-socket-activate is not installed (Debian package: systemd)")
    home = make_home(tmp_path)
    # The daemon must use the passed socket, not bind the configured path: point the config
    # elsewhere, so a daemon that ignored the passed socket would not answer on this one.
    passed = tmp_path / "activated.sock"
    env = clean_env()
    command = [activate, "-l", str(passed), "--fdname=api"]
    command += [f"-E{k}={env[k]}" for k in ("PATH", "HOME", "VIRTUAL_ENV") if k in env]
    command += [sys.executable, "-m", "broker", "serve", "-c", str(home.config)]
    log_path = log_dir / "socket-activated.stderr.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, cwd=tmp_path
        )
        try:
            deadline = time.monotonic() + 10
            while not passed.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            # The first connection starts the daemon, which answers it once it is ready.
            reply = request(passed, "GET", "/healthz", timeout=20)
            assert reply.status == 200
            assert request(passed, "GET", "/v1/grants").json() == []
            assert not home.socket.exists()
        finally:
            os.kill(process.pid, signal.SIGTERM)  # the pid is the daemon's: the tool exec'd it
            code = process.wait(20)
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    assert '"socket_activated": true' in log or "socket_activated=True" in log
    assert passed.exists()  # the socket file belongs to whoever passed it


def test_a_passed_socket_without_the_api_name_is_refused(tmp_path: Path, log_dir: Path) -> None:
    """Two passed sockets, neither named "api": the daemon says how to fix the unit and exits 1."""
    home: Home = make_home(tmp_path)
    script = (
        "import os, socket, sys\n"
        "socks = [socket.socket(socket.AF_UNIX) for _ in range(2)]\n"
        "for i, s in enumerate(socks):\n"
        f"    s.bind({str(tmp_path)!r} + f'/p{{i}}.sock'); s.listen()\n"
        "    os.dup2(s.fileno(), 3 + i)\n"
        "os.environ.update(LISTEN_FDS='2', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='a:b')\n"
        "sys.argv = ['token-broker', 'serve', '-c', sys.argv[1]]\n"
        "from broker.cli import main\n"
        "sys.exit(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(home.config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )
    (log_dir / "activation-refused.stderr.log").write_text(result.stderr)
    assert result.returncode == 1
    assert "FileDescriptorName=api" in result.stderr


def test_activated_sockets_ignores_sockets_meant_for_another_process() -> None:
    """LISTEN_PID naming another pid (an inherited environment) passes nothing."""
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "api"}
    assert activated_sockets(environ) == {}
    assert activated_sockets({}) == {}


def test_a_full_notification_queue_never_blocks_the_daemon(notify_socket: NotifySocket) -> None:
    """When nobody reads the notification socket, messages are dropped instead of blocking."""
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path)})
    started = time.monotonic()
    sent = [notifier.watchdog() for _ in range(1000)]
    assert time.monotonic() - started < 5
    assert sent[0]
    assert not all(sent)  # the queue filled up and later messages were dropped
