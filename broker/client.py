"""A small synchronous HTTP client for the daemon's Unix socket, used by the CLI."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


class DaemonUnreachable(Exception):
    """Nothing answers on the socket."""


class ApiError(Exception):
    """The daemon answered with a problem."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class BrokerClient:
    """Calls the daemon's HTTP API over its Unix socket."""

    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: object | None = None,
        *,
        content_type: str = "application/json",
    ) -> Any:
        """Send one request (a body of bytes is sent as it is, as `content_type`; anything else
        as JSON); the decoded JSON answer, or ApiError / DaemonUnreachable."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        headers = {"Accept": "application/json"}
        payload = None
        if isinstance(body, bytes):
            payload = body
            headers["Content-Type"] = content_type
        elif body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise DaemonUnreachable(
                f"cannot reach the daemon at {self.socket_path}: {exc.strerror}; "
                "is `token-broker serve` running, and may you open its socket?"
            ) from None
        except OSError as exc:
            raise DaemonUnreachable(
                f"the daemon at {self.socket_path} did not answer: {exc}"
            ) from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(response.status, "bad_response", "the daemon sent non-JSON") from None
        if response.status >= 400:
            problem = data if isinstance(data, dict) else {}
            raise ApiError(
                response.status,
                str(problem.get("code", "error")),
                str(problem.get("detail", response.reason)),
            )
        return data
