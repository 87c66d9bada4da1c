"""The IdP process's mutable test state: token settings, counters and injected faults.

One IdP per process, so these live in module singletons that the settings, the validator and
the /test/ views share. Every counter and fault is guarded by a lock: the server is threaded.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Runtime:
    """Token settings that POST /test/settings may change while the server runs."""

    access_token_lifetime: int
    refresh_grace: int
    reuse_protection: bool
    introspection: bool = True  # False: /o/introspect/ refuses every caller (invalid_client)
    # RFC 8628: the polling interval (DOT's default is 5 s; 1 keeps the tests quick) and the
    # life of the device and user codes it hands out.
    device_interval: int = 1
    device_expires_in: int = 600

    @classmethod
    def from_env(cls) -> Runtime:
        return cls(
            access_token_lifetime=int(os.environ.get("TB_IDP_ACCESS_TOKEN_LIFETIME", "36000")),
            refresh_grace=int(os.environ.get("TB_IDP_REFRESH_GRACE", "0")),
            reuse_protection=os.environ.get("TB_IDP_REUSE_PROTECTION", "1") == "1",
        )

    def expires_in(self, _request: object) -> int:
        """oauthlib's `token_expires_in` callable: the current access-token lifetime."""
        return self.access_token_lifetime

    def update(self, changes: dict[str, Any]) -> None:
        """Apply changes; DOT caches settings as attributes, so those are overwritten too."""
        from oauth2_provider.settings import oauth2_settings  # type: ignore[import-untyped]

        if "access_token_lifetime" in changes:
            self.access_token_lifetime = int(changes["access_token_lifetime"])
        if "refresh_grace" in changes:
            self.refresh_grace = int(changes["refresh_grace"])
            oauth2_settings.REFRESH_TOKEN_GRACE_PERIOD_SECONDS = self.refresh_grace
        if "reuse_protection" in changes:
            self.reuse_protection = bool(changes["reuse_protection"])
            oauth2_settings.REFRESH_TOKEN_REUSE_PROTECTION = self.reuse_protection
        if "introspection" in changes:
            self.introspection = bool(changes["introspection"])
        if "device_interval" in changes:
            self.device_interval = int(changes["device_interval"])
        if "device_expires_in" in changes:
            self.device_expires_in = int(changes["device_expires_in"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "access_token_lifetime": self.access_token_lifetime,
            "refresh_grace": self.refresh_grace,
            "reuse_protection": self.reuse_protection,
            "introspection": self.introspection,
            "device_interval": self.device_interval,
            "device_expires_in": self.device_expires_in,
        }


@dataclass
class Stats:
    """Counters since the process started (a restart resets them)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    token_requests: Counter[str] = field(default_factory=Counter)
    refresh_failed: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    introspections: Counter[str] = field(default_factory=Counter)

    def token_request(self, grant_type: str) -> None:
        with self.lock:
            self.token_requests[grant_type] += 1

    def refresh_failure(self, error: str) -> None:
        with self.lock:
            self.refresh_failed[error] += 1

    def introspection(self, answer: str) -> None:
        """Count one introspection request by its answer: active, inactive, refused, http_N."""
        with self.lock:
            self.introspections["requests"] += 1
            self.introspections[answer] += 1

    def add(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "token_requests": dict(self.token_requests),
                "refresh_ok": self.counts["refresh_ok"],
                "refresh_failed": dict(self.refresh_failed),
                "spent_refresh_presented": self.counts["spent_refresh_presented"],
                "reuse_family_revocations": self.counts["reuse_family_revocations"],
                "in_grace_replays": self.counts["in_grace_replays"],
                "same_pair_returned": self.counts["same_pair_returned"],
                "injected_faults": self.counts["injected_faults"],
                "introspection": {
                    "requests": 0,
                    "active": 0,
                    "inactive": 0,
                    "refused": 0,
                    **self.introspections,
                },
            }


@dataclass
class Faults:
    """Token-endpoint faults armed by POST /test/faults, each for the next `count` requests."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    status: int = 0
    status_body: str = ""
    status_left: int = 0
    delay: float = 0.0
    delay_left: int = 0

    def arm(self, spec: dict[str, Any]) -> None:
        count = int(spec.get("count", 1))
        with self.lock:
            if "token_status" in spec:
                self.status = int(spec["token_status"])
                self.status_body = str(spec.get("body", f"injected fault {self.status}\n"))
                self.status_left = count
            if "token_delay" in spec:
                self.delay = float(spec["token_delay"])
                self.delay_left = count
            if spec.get("clear"):
                self.status_left = self.delay_left = 0

    def take_status(self) -> tuple[int, str] | None:
        """The status to answer with instead of processing, if one is armed."""
        with self.lock:
            if self.status_left <= 0:
                return None
            self.status_left -= 1
            return self.status, self.status_body

    def take_delay(self) -> float:
        """Seconds to hold a processed response back, if a delay is armed."""
        with self.lock:
            if self.delay_left <= 0:
                return 0.0
            self.delay_left -= 1
            return self.delay


RUNTIME = Runtime.from_env()
STATS = Stats()
FAULTS = Faults()
