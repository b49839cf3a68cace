"""What the change kinds (``pg_cdc``, ``mysql_cdc``) share: their records made a prepared
batch (in a worker), the future a batch's commit resolves, the batches given up when a
read fails, the key-change rule, and the recovery an operator follows when the position
in the source's log is gone."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec
import structlog

from etlsvc.contract import (
    OP_DELETE,
    OP_UPDATE,
    Backfill,
    Batch,
    Prepared,
    Preparing,
)
from etlsvc.errors import BackfillError, describe
from etlsvc.extract.records import project, text
from etlsvc.extract.sql_tables import fraction
from etlsvc.transform.drift import shape_of_items

log = structlog.get_logger()
_encode = msgspec.json.Encoder(decimal_format="number").encode
T = TypeVar("T")


def prepare_records(preparer: Preparing, stream: str, streams: list[str],
                    positions: list[tuple[int, ...]], records: list[dict[str, Any]],
                    unchecked: list[tuple[str, ...] | None], *, state: dict[str, Any],
                    clear: list[str] | None = None,
                    sweep: list[tuple[str, int]] | None = None,
                    read_point: str | None = None) -> Prepared:
    """In a worker: records of changes (or of a snapshot) → a prepared batch. ``streams``
    names each row's table; ``unchecked`` the columns a row lacks (None: a delete, not
    validated); ``read_point``: a backfill's."""
    src = preparer.src
    raws = [_encode(r) for r in records]
    items = [msgspec.json.decode(r) for r in raws]    # as the SQL will see them
    columns = list(dict.fromkeys(src.fields.mapped().values()))
    whole = [item for item, u in zip(items, unchecked) if u == ()]
    batch = Batch(stream, columns, project(items, columns, flat=True), positions, raws,
                  rows_read=len(items), bytes_read=sum(map(len, raws)), state=state,
                  shape=shape_of_items(whole), row_streams=streams, unchecked=unchecked,
                  clear=clear or [], sweep=sweep or [], read_point=read_point)
    return preparer(batch)


def backfill_state(bf: Backfill, rows: int, last_key: Any) -> dict[str, Any]:
    """The checkpoint of a change kind's backfill after a batch: the key it goes on after
    (a table's rows are read in key order), and its progress."""
    after = text(last_key)
    return {"after": after, "rows": rows, "at": after,
            "fraction": fraction(bf.start, bf.end, after)}


def backfill_table(src: Any, stream: str | None, tables: list[str]) -> str:
    """The table a change kind's backfill reads: ``stream``, one of ``tables`` (the
    source's, qualified), or the only one; BackfillError otherwise."""
    if stream is None:
        if len(tables) != 1:
            raise BackfillError(f"source {src.name!r} has several tables: name one with "
                                f"--table ({', '.join(tables) or 'those of its publication'})",
                                "bad_range")
        return tables[0]
    if tables and stream not in tables:
        raise BackfillError(f"source {src.name!r} does not capture table {stream} "
                            f"(its tables: {', '.join(tables)})", "bad_range")
    return stream


def update_rows(old: dict[str, Any] | None, new: dict[str, Any],
                key_column: str) -> list[tuple[int, dict[str, Any]]]:
    """The raw rows of an update: an update whose key changed is a delete of the old key
    (its row leaves) and an update under the new one."""
    if old is not None and old.get(key_column) is not None and \
            text(old.get(key_column)) != text(new.get(key_column)):
        return [(OP_DELETE, old), (OP_UPDATE, new)]
    return [(OP_UPDATE, new)]


def awaited(prepared: Prepared) -> Prepared:
    """``prepared`` with a future its commit resolves (``Prepared.committed``)."""
    prepared.committed = asyncio.get_running_loop().create_future()
    return prepared


class Building(Generic[T]):
    """Batches being built in a worker, oldest first, each with what it ends at (its last
    transaction): one builds while the reader reads the next (it halved the time of 1M
    single-row changes), and they are handed on in order."""

    def __init__(self) -> None:
        self._queue: deque[tuple[asyncio.Future[Prepared], T]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, build: Awaitable[Prepared], end: T) -> None:
        self._queue.append((asyncio.ensure_future(build), end))

    async def next(self) -> tuple[Prepared, T]:
        """The oldest batch once built (with the future its commit resolves), and its end."""
        task, end = self._queue.popleft()
        return awaited(await task), end

    def drop(self) -> None:
        """Give up the batches being built (the read failed: they are read again; or the
        run stopped: nothing waits for them)."""
        while self._queue:
            task, _ = self._queue.popleft()
            if task.done() and not task.cancelled():
                task.exception()            # retrieved: not logged as never retrieved
            task.cancel()


async def wait_to_reconnect(deadline: float | None, reconnect_timeout_s: float,
                            exc: BaseException,
                            fail: Callable[[str], Exception]) -> float:
    """After the source's connection was lost (``exc``): the deadline of this outage
    (``reconnect_timeout_s`` from its start), raised as ``fail(…)`` once past, else a second's
    wait before the next attempt."""
    deadline = deadline or time.monotonic() + reconnect_timeout_s
    if time.monotonic() > deadline:
        raise fail(f"the source database was unreachable for more than reconnect_timeout_s "
                   f"({reconnect_timeout_s:g} s): {describe(exc)}") from exc
    log.warning("source connection lost; reconnecting", error=describe(exc))
    await asyncio.sleep(1)
    return deadline


RECOVERY = ("To recover: `etlsvc cdc reset {source}` (it forgets the checkpoints{slot}), "
            "then run the source again: it snapshots its tables anew, and rows deleted "
            "meanwhile leave.")
