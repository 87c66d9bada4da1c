"""When a provider may be called: paused for its client registration, or backing off.

Two things are about a provider, not about one grant, and so stop every grant of it at once
instead of costing each grant a failed attempt:

- `invalid_client` / `unauthorized_client` (ROTATION.md invariant 5): the provider refuses this
  client. Refreshing pauses (exported as `token_broker_provider_paused`); a probe is let through
  after a back-off, and a success, or a reload of the provider's config, resumes it. No grant is
  touched: the user's tokens may be fine once the registration is fixed.
- discovery or keys cannot be fetched: nothing was sent (a "never sent" failure), but every grant
  of the provider would fail the same way, so the provider backs off as a whole.

Pure: time is a monotonic number of seconds passed in, randomness a number in [0, 1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PAUSE_BASE = 30.0  # seconds before the first probe after invalid_client
PAUSE_CAP = 600.0
UNREACHABLE_BASE = 2.0  # seconds before retrying discovery after it failed
UNREACHABLE_CAP = 60.0


class GateState(enum.StrEnum):
    """Why a provider is not being called."""

    OPEN = "open"
    PAUSED = "paused"  # the provider refuses this client
    UNREACHABLE = "unreachable"  # its metadata or keys cannot be fetched


@dataclass(slots=True)
class ProviderGate:
    """One provider's gate; `closed(now)` says whether a refresh may start now."""

    state: GateState = GateState.OPEN
    until: float = 0.0
    failures: int = 0
    reason: str = ""

    def closed(self, now: float) -> bool:
        """Whether refreshes must not start now (a paused provider lets one probe through
        once its back-off has passed)."""
        return self.state is not GateState.OPEN and now < self.until

    @property
    def paused(self) -> bool:
        """Whether the provider refuses this client (until a success or a reload)."""
        return self.state is GateState.PAUSED

    def retry_after(self, now: float) -> float | None:
        """Seconds until the gate lets a refresh through, or None when it is open."""
        if not self.closed(now):
            return None
        return self.until - now

    def pause(self, reason: str, now: float, rand: float) -> None:
        """The provider refused this client: pause, with a growing back-off between probes."""
        self.failures = self.failures + 1 if self.state is GateState.PAUSED else 1
        self.state, self.reason = GateState.PAUSED, reason
        self.until = now + _step(PAUSE_BASE, PAUSE_CAP, self.failures, rand)

    def unreachable(self, reason: str, now: float, rand: float) -> None:
        """Discovery or keys failed before anything was sent: back off the whole provider."""
        if self.state is GateState.PAUSED:
            return  # the pause says more, and a probe is what will end it
        self.failures = self.failures + 1 if self.state is GateState.UNREACHABLE else 1
        self.state, self.reason = GateState.UNREACHABLE, reason
        self.until = now + _step(UNREACHABLE_BASE, UNREACHABLE_CAP, self.failures, rand)

    def open(self) -> None:
        """A call got through (or the provider was reconfigured): call it freely again."""
        self.state, self.until, self.failures, self.reason = GateState.OPEN, 0.0, 0, ""


def _step(base: float, cap: float, failures: int, rand: float) -> float:
    step = min(cap, base * (1 << min(failures - 1, 20)))
    return step / 2 + step / 2 * rand
