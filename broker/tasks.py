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
        """Cancel every task still running and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)
