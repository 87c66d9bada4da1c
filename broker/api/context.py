"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from aiohttp import web

from broker.api.identity import Caller, Policy
from broker.grants import GrantService
from broker.metrics import Metrics

SERVICE = web.AppKey("service", GrantService)
METRICS = web.AppKey("metrics", Metrics)
POLICY = web.AppKey("policy", Policy)
Clock = Callable[[], datetime]
Readiness = Callable[[], Awaitable[list[str]]]
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
CALLER = "broker.caller"  # request key: the identified Caller

__all__ = ["CALLER", "CLOCK", "METRICS", "POLICY", "READINESS", "SERVICE", "Caller"]
