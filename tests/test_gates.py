"""Provider gates: a provider refusing this client pauses; one whose discovery fails backs off."""

from __future__ import annotations

import pytest

from broker.gates import PAUSE_BASE, PAUSE_CAP, UNREACHABLE_BASE, GateState, ProviderGate


def test_a_new_gate_is_open() -> None:
    """Nothing has gone wrong yet: refreshes may start, and nothing says to wait."""
    gate = ProviderGate()
    assert not gate.closed(0.0)
    assert gate.retry_after(0.0) is None
    assert not gate.paused


def test_a_pause_closes_the_gate_until_its_back_off_and_then_lets_a_probe_through() -> None:
    """invalid_client pauses the provider for PAUSE_BASE/2..PAUSE_BASE; after that a probe may
    go, and the gate stays paused until something succeeds."""
    gate = ProviderGate()
    gate.pause("the IdP refused (401 invalid_client)", now=100.0, rand=0.0)
    assert gate.paused
    assert gate.state is GateState.PAUSED
    assert gate.closed(100.0)
    assert gate.retry_after(100.0) == pytest.approx(PAUSE_BASE / 2)
    assert not gate.closed(100.0 + PAUSE_BASE / 2)
    assert gate.paused  # a probe may go, but the provider is still paused


@pytest.mark.parametrize("probes", [1, 2, 3, 10, 30])
def test_each_refused_probe_doubles_the_pause_up_to_its_cap(probes: int) -> None:
    """Probes that are refused again wait twice as long each time, at most PAUSE_CAP."""
    gate = ProviderGate()
    for _ in range(probes):
        gate.pause("refused", now=0.0, rand=1.0 - 1e-12)
    assert gate.until == pytest.approx(min(PAUSE_CAP, PAUSE_BASE * 2 ** (probes - 1)))


def test_open_ends_a_pause_at_once() -> None:
    """A success, or a reload of the provider's config, calls it freely again."""
    gate = ProviderGate()
    gate.pause("refused", now=0.0, rand=0.5)
    gate.open()
    assert not gate.paused
    assert not gate.closed(0.0)
    assert gate.failures == 0


def test_unreachable_backs_off_briefly_and_grows() -> None:
    """Discovery that cannot be fetched backs the provider off from UNREACHABLE_BASE/2 up."""
    gate = ProviderGate()
    gate.unreachable("cannot connect", now=10.0, rand=0.0)
    assert gate.state is GateState.UNREACHABLE
    assert gate.retry_after(10.0) == pytest.approx(UNREACHABLE_BASE / 2)
    gate.unreachable("cannot connect", now=20.0, rand=0.0)
    assert gate.retry_after(20.0) == pytest.approx(UNREACHABLE_BASE)


def test_unreachable_does_not_hide_a_pause() -> None:
    """While paused, a discovery failure changes nothing: the pause says more."""
    gate = ProviderGate()
    gate.pause("refused", now=0.0, rand=0.0)
    until = gate.until
    gate.unreachable("cannot connect", now=1.0, rand=1.0)
    assert gate.paused
    assert gate.until == until
