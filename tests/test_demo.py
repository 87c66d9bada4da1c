"""`make demo` runs end to end: provider, daemon, headless login, token, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_logs_in_serves_a_token_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    """The demo prints a token the provider accepts, and SIGINT stops it with nothing left."""
    out = tmp_path / "demo.out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with out.open("wb") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "demo"],
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while "The daemon's log follows" not in out.read_text():
            assert demo.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=90)  # normally ~3 s; the daemon and the IdP each get a drain
    text = out.read_text()
    assert code == 0, text
    assert "userinfo endpoint answers 200" in text
    assert "login complete" in text
    assert "stopped the daemon and the identity provider" in text
    assert not (tmp_path / "var/demo/broker.sock").exists()
