"""Logins that finish at the same moment: each one ends complete or failed, never stuck.

`tests.tinyidp.TinyIdP` with a barrier holds its token answers until both exchanges are
waiting, so two logins for the same grant reach the broker's store in lockstep, the way two
browser tabs would, or a login racing a background refresh of the same grant.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests import tinyidp
from tests.idp.browser import login
from tests.inprocess import Broker, Reply, serving_broker
from tests.tinyidp import StartTinyIdP, TinyIdP, tiny

tiny_idp_factory = tinyidp.tiny_idp_factory

PROVIDER, USER = "tiny", "alice"
ROUNDS = 3


async def finish_together(broker: Broker, idp: TinyIdP) -> tuple[list[Reply], list[str]]:
    """Two logins for tiny/alice whose redirects arrive at once; the pages and login states."""
    started = [await broker.start_login(PROVIDER, USER) for _ in range(2)]
    arrivals = [await login(s.authorize_url, USER, "unused") for s in started]
    idp.barrier = asyncio.Barrier(2)
    replies = await asyncio.gather(*(broker.callback(a.redirect_url) for a in arrivals))
    idp.barrier = None
    return replies, [(await broker.login_status(s.id))["state"] for s in started]


async def test_two_logins_for_an_existing_grant_finishing_together_both_complete(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """Both logins complete, the later write landing on the earlier (generation + 2 per
    round); none is left pending behind a 500 page."""
    idp = await tiny_idp_factory()
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        started = await broker.start_login(PROVIDER, USER)
        await login(started.authorize_url, USER, "unused", follow=True)
        assert (await broker.grant(PROVIDER, USER)).json()["generation"] == 1

        for round_ in range(ROUNDS):
            replies, states = await finish_together(broker, idp)
            assert states == ["complete", "complete"], (round_, [r.text for r in replies])
            assert [reply.status for reply in replies] == [200, 200]
            grant = (await broker.grant(PROVIDER, USER)).json()
            assert (grant["generation"], grant["state"]) == (1 + 2 * (round_ + 1), "active")
        assert await broker.access_token(PROVIDER, USER) in idp.issued
        broker.assert_not_logged(*idp.issued)


async def test_two_first_logins_finishing_together_store_the_grant_and_both_end(
    tmp_path: Path, log_dir: Path, tiny_idp_factory: StartTinyIdP
) -> None:
    """With no grant yet, both logins still end (complete, or failed with a reason and a 400
    page, never a 500 and never pending) and the grant is stored."""
    idp = await tiny_idp_factory()
    async with serving_broker(tmp_path, log_dir, {PROVIDER: tiny(idp)}) as broker:
        replies, states = await finish_together(broker, idp)
        assert "complete" in states, [r.text for r in replies]
        assert set(states) <= {"complete", "failed"}, states
        for reply, state in zip(replies, states, strict=True):
            assert reply.status == (200 if state == "complete" else 400), reply.text
        grant = (await broker.grant(PROVIDER, USER)).json()
        assert (grant["state"], grant["sub"]) == ("active", "tiny-sub")
        broker.assert_not_logged(*idp.issued)
