"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from aiohttp import web

from broker.api.identity import Caller, Policy
from broker.api.watch import Watches
from broker.grants import GrantService
from broker.login import LoginService
from broker.metrics import Metrics

SERVICE = web.AppKey("service", GrantService)
LOGINS = web.AppKey("logins", LoginService)
METRICS = web.AppKey("metrics", Metrics)
POLICY = web.AppKey("policy", Policy)
WATCHES = web.AppKey("watches", Watches)
Clock = Callable[[], datetime]
Readiness = Callable[[], Awaitable[list[str]]]
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
CALLER = web.RequestKey("caller", Caller)

__all__ = [
    "CALLER",
    "CLOCK",
    "LOGINS",
    "METRICS",
    "POLICY",
    "READINESS",
    "SERVICE",
    "WATCHES",
    "Caller",
]
