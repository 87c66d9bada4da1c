"""broker.tasks: background tasks end when cancelled, even ones that swallow a cancellation."""

from __future__ import annotations

import asyncio

from broker.tasks import Tasks, wait_event


async def test_cancel_all_ends_a_task_that_swallowed_the_first_cancellation() -> None:
    """A task that lives on after one cancellation (as a loop around Python 3.11's wait_for
    can) is cancelled again until it ends."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    tasks = Tasks()
    task = tasks.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.cancel_all(), 5)
    assert task.cancelled()
    assert swallowed == 1
    assert len(tasks) == 0


async def test_wait_event_says_whether_the_event_was_set() -> None:
    """wait_event returns True once the event is set, False when the time runs out."""
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5)
