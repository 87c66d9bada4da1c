"""The one place background tasks are created: it keeps a reference to each until it ends.

asyncio holds only weak references to tasks, so a task nobody stores can be garbage-collected
mid-flight; ruff bans bare `asyncio.create_task` everywhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog

T = TypeVar("T")
RECANCEL_SECONDS = 1.0
log = structlog.get_logger("broker.tasks")


class Tasks:
    """Background tasks with strong references, cancelled together on shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Start `coro` as a task that lives until it finishes or `cancel_all` runs."""
        task = asyncio.create_task(coro, name=name)  # noqa: TID251 - the one sanctioned place
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Whoever awaits the task sees the error too; this catches tasks nobody awaits.
            log.debug("task_failed", task=task.get_name(), error=repr(task.exception()))

    async def cancel_all(self) -> None:
        """Cancel every task still running and wait for them to end.

        A task that lives on is cancelled again every RECANCEL_SECONDS: on Python 3.11,
        `asyncio.wait_for` can swallow a cancellation that arrives as its awaitable completes,
        and a loop around it would otherwise run on forever.
        """
        tasks = list(self._tasks)
        while tasks:
            for task in tasks:
                task.cancel()
            _, pending = await asyncio.wait(tasks, timeout=RECANCEL_SECONDS)
            tasks = list(pending)

    def __len__(self) -> int:
        return len(self._tasks)


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait at most `seconds` for `event`; whether it was set. Unlike `asyncio.wait_for` on
    Python 3.11, a cancellation that arrives as the event is set is never lost."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
