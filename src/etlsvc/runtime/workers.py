"""The executor of CPU-bound work: parsing, validation and COPY encoding of batches.

The runtime creates one :class:`Workers` (``etlsvc run``, ``etlsvc serve`` and the tests
alike), sized by ``[pipeline] workers``, and hands it to every run. Each worker is a
process of its own (spawned, so it shares no locks with the event loop's process), which
keeps parsing from competing with the event loop for the GIL: a big load does not slow the
read API, and two files parse on two cores. Workers run at a lower CPU priority (``nice``)
and die with etlsvc, even on ``kill -9``.

Two ways to use them: ``run(fn, *args)`` for a stateless task (a page of API items to
prepare), and ``open(factory, *args)`` for an object that lives in one worker across calls
(the parser of one file, which carries its position, header and fingerprint from chunk to
chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import itertools
import multiprocessing
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from etlsvc.children import die_with_parent
from etlsvc.config import PipelineConfig
from etlsvc.errors import WorkerDied

T = TypeVar("T")

_M_MMAP_THRESHOLD = -3                  # glibc's mallopt parameter
_GC_YOUNG = 100_000                     # new objects between collections in a worker

#: Objects opened in this worker process, by handle.
_OBJECTS: dict[int, Any] = {}


def map_big_buffers() -> None:
    """Have glibc give every allocation of 1 MiB or more its own mapping (in etlsvc's
    process, which holds the batches in flight).

    Batches cross between processes as buffers of a few MiB. By default glibc raises its
    mmap threshold after the first such buffer is freed, and the next ones come from the
    heap, where freeing them leaves the process at its high-water mark: peak RSS grows with
    the batches in flight. A fixed threshold returns each buffer to the system when freed.
    Not in the workers: there each big buffer (a decoded chunk, a payload, the lists of a
    batch) would be faulted in page by page, a quarter of a worker's CPU, for a peak RSS
    that one batch bounds anyway.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _start(parent: int, niceness: int) -> None:
    """In a new worker: die with etlsvc, collect garbage rarely, and yield the CPU to etlsvc
    (the API goes first)."""
    die_with_parent(parent=parent)
    # Parsing makes a list per row that lives as long as its batch. None is part of a
    # cycle, yet every young-generation collection (one per 700 new objects by default)
    # walks the survivors: a tenth of a worker's CPU. Collections stay on, just rarer.
    gc.set_threshold(_GC_YOUNG, 10, 10)
    # The code the work will use, imported now, and set aside from the collector: an
    # older-generation collection walks every object alive, and those are most of them
    # (a fifth of building a batch of single-row changes, measured).
    import etlsvc.extract

    # (and the loader's side of a batch, which the kinds' prepare step calls)
    import etlsvc.load.batches  # noqa: F401
    gc.freeze()
    if niceness:
        os.nice(niceness)


def _open(handle: int, factory: Callable[..., Any], args: tuple[Any, ...]) -> None:
    _OBJECTS[handle] = factory(*args)


def _call(handle: int, method: str, args: tuple[Any, ...]) -> Any:
    return getattr(_OBJECTS[handle], method)(*args)


def _close(handle: int) -> None:
    obj = _OBJECTS.pop(handle, None)
    if obj is not None and hasattr(obj, "close"):
        obj.close()


class Handle:
    """An object living in one worker process; ``call`` runs one of its methods there."""

    def __init__(self, workers: Workers, lane: int, handle: int) -> None:
        self._workers = workers
        self._lane = lane
        self._handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        """``obj.method(*args)`` in the worker, awaited."""
        return await self._workers._submit(self._lane, _call, self._handle, method, args)


class Workers:
    """A fixed set of worker processes, each with its own queue of tasks."""

    def __init__(self, size: int, niceness: int = 0) -> None:
        map_big_buffers()               # this side receives the batches
        self.size = max(1, size)
        self.niceness = niceness
        self._lanes: list[ProcessPoolExecutor | None] = [None] * self.size
        self._load = [0] * self.size
        self._handles = itertools.count(1)

    def _lane(self, i: int) -> ProcessPoolExecutor:
        lane = self._lanes[i]
        if lane is None:          # started on first use: a run of an API costs no spawn
            lane = self._lanes[i] = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                initargs=(os.getpid(), self.niceness))
        return lane

    def _least_loaded(self) -> int:
        return min(range(self.size), key=self._load.__getitem__)

    async def _submit(self, i: int, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        self._load[i] += 1
        try:
            return await loop.run_in_executor(self._lane(i), fn, *args)
        except BrokenProcessPool as exc:
            broken, self._lanes[i] = self._lanes[i], None     # the next task gets a new one
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            raise WorkerDied(f"a worker process died while parsing ({exc}); "
                             "the run resumes from its last committed batch next time") from exc
        finally:
            self._load[i] -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the least busy worker (``fn`` and the arguments must pickle)."""
        return await self._submit(self._least_loaded(), fn, *args)

    @contextlib.asynccontextmanager
    async def open(self, factory: Callable[..., Any], *args: Any) -> AsyncIterator[Handle]:
        """``factory(*args)`` made in the least busy worker, for the block's duration."""
        i = self._least_loaded()
        handle = next(self._handles)
        self._load[i] += 1              # an open object keeps its worker busy
        try:
            await self._submit(i, _open, handle, factory, args)
            try:
                yield Handle(self, i, handle)
            finally:
                if self._lanes[i] is not None:
                    with contextlib.suppress(WorkerDied):
                        await asyncio.shield(self._submit(i, _close, handle))
        finally:
            self._load[i] -= 1

    async def aclose(self) -> None:
        """``shutdown`` without blocking the event loop."""
        await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        """Stop the worker processes (tasks still queued are cancelled)."""
        for i, lane in enumerate(self._lanes):
            if lane is not None:
                lane.shutdown(wait=True, cancel_futures=True)
                self._lanes[i] = None


def from_config(cfg: PipelineConfig) -> Workers:
    """The workers ``[pipeline]`` asks for (``workers = 0``: one per core, at most 4)."""
    size = cfg.workers or max(1, min(4, len(os.sched_getaffinity(0))))
    return Workers(size, cfg.worker_niceness)
