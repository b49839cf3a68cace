"""Async iteration that keeps work in flight: produce ahead, and merge concurrent producers.

Owns the two shapes of overlap the pipeline uses: ``prefetch`` (the next batch is prepared
while this one commits) and ``merge`` (several streams of a source — the files of a glob —
read at once, their batches interleaved as they come); and ``abandon``, for work that is
given up on without waiting for it to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_END = object()


@dataclass
class _Failed:
    exc: BaseException


async def prefetch(items: AsyncIterator[T], depth: int = 1) -> AsyncIterator[T]:
    """Iterate ``items`` with up to ``depth`` items produced ahead (overlaps CPU and I/O)."""
    async for item in merge([items], 1, depth):
        yield item


async def merge(sources: Iterable[AsyncIterator[T]], limit: int,
                depth: int = 1) -> AsyncIterator[T]:
    """The items of every iterator of ``sources``, as they come, with at most ``limit`` of
    them running at once (the next starts when one ends) and ``depth`` items waiting.

    The first error of any of them ends the merge (the others are cancelled) and is raised.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=depth)
    pending = iter(sources)
    running: set[asyncio.Task[None]] = set()

    async def produce(items: AsyncIterator[T]) -> None:
        try:
            async for item in items:
                await queue.put(item)
            await queue.put(_END)
        except Exception as exc:
            await queue.put(_Failed(exc))

    def start_next() -> bool:
        items = next(pending, None)
        if items is None:
            return False
        running.add(asyncio.create_task(produce(items)))
        return True

    while len(running) < limit and start_next():
        pass
    active = len(running)
    try:
        while active:
            item = await queue.get()
            if item is _END:
                active -= 1
                if start_next():
                    active += 1
                continue
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def abandon(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` without waiting for it to end: its cancellation may itself wait (giving
    a connection back to the pool needs the database, which may be stalled). Its outcome is
    retrieved when it ends, so that asyncio logs nothing about it."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
