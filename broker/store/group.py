"""Group commit: writes that arrive while one transaction is committing go together in the next.

A durable commit costs a flush to disk (and on PostgreSQL a round trip and the change
sequence's row lock) whatever it holds. When many refreshes end at once, `GroupCommit` writes
all the outcomes that queued up during one commit in a single transaction, so the store's
commit rate bounds the rate of batches, not of rotations. One write alone goes at once: a
queue that is empty costs no waiting. With `ready` (the store's writer being free), a batch is
gathered only once the store can take it, so writes that arrive while another transaction of
this process holds the store join the batch instead of following it one by one.

Each submitter gets its own result (or its own exception, such as a ConflictError for a
compare-and-swap that missed) and nothing is published before its transaction has committed:
`submit` returns only then. A transaction that fails fails every write in it; each submitter
retries as it would after a failed write of its own (their write ids make that safe). A write
whose submitter is cancelled before its batch starts is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from broker.errors import StoreUnavailable
from broker.tasks import Tasks

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Batches of `T` written by `flush`, which answers one `R` or exception per item."""

    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R | Exception]]],
        *,
        limit: int,
        name: str,
        ready: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._flush = flush
        self._ready = ready
        self._limit = limit
        self._name = name
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks = Tasks()
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Write `item` in the next transaction; its result once that has committed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._draining is None or self._draining.done():
            self._draining = self._tasks.spawn(self._drain(), self._name)
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                if self._ready is not None:
                    # Until the store can take the batch at once: what queues meanwhile joins.
                    await self._ready()
                batch = [(item, f) for item, f in self._queue[: self._limit] if not f.done()]
                del self._queue[: self._limit]
                if batch:
                    await self._write(batch)
        except BaseException:  # cancelled: the writes still queued never started
            for _, future in self._queue:
                if not future.done():
                    future.set_exception(StoreUnavailable("the write was interrupted"))
            self._queue.clear()
            raise

    async def _write(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the transaction failed, and every write in it
            for _, future in batch:
                if not future.done():
                    future.set_exception(_own_copy(exc))
            return
        except BaseException:  # cancelled mid-transaction: whether it landed is unknown
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable("the write was interrupted"))
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def _own_copy(exc: Exception) -> Exception:
    """An exception of the same kind for one submitter (each raises its own instance)."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:  # noqa: BLE001 - a type that cannot be rebuilt from its args
        return exc
    copy.__cause__ = exc
    return copy
