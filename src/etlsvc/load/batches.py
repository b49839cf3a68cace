"""The one batch path: a :class:`Batch` of any kind → prepared → committed.

``Preparer`` (in a worker process: pure CPU) validates a batch's rows, turns the failures
into rejects and encodes the rest as one COPY payload for the kind's raw table. ``commit``
(on the event loop) writes a prepared batch in one transaction: raw rows by COPY, their
normalization, rejects, the stream's checkpoint and the run's counters — all or nothing,
so a checkpoint is never ahead of the data.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter
from typing import Any

import asyncpg
import msgspec

from etlsvc import db
from etlsvc.errors import SourceError
from etlsvc.extract.contract import Batch, Fields, Reject, SourceConfig, SourceKind
from etlsvc.load import checkpoint, raw
from etlsvc.runtime import runs
from etlsvc.transform import normalize
from etlsvc.transform.validate import RowValidator


@dataclass
class Prepared:
    """A batch ready for the database: COPY payload, rejects, counters, checkpoint state."""

    #: The stream whose checkpoint the batch moves.
    stream: str
    payload: bytes
    valid: int
    #: No two valid rows share a natural key (the upsert can skip its dedupe sort).
    distinct_keys: bool
    rejects: list[Reject]
    rows_read: int
    bytes_read: int
    state: dict[str, Any]
    pages: int = 0
    lines: int = 0
    #: Called once the batch is committed (a stream acknowledges its messages then).
    after_commit: Callable[[], Awaitable[Any]] | None = None

    def counts(self, inserted: int, updated: int) -> dict[str, int]:
        """The run's counters for this batch once committed."""
        return {"rows_read": self.rows_read, "rows_valid": self.valid,
                "rows_rejected": len(self.rejects), "rows_inserted": inserted,
                "rows_updated": updated, "rows_unchanged": self.valid - inserted - updated,
                "bytes_read": self.bytes_read, "pages_read": self.pages,
                "lines_read": self.lines}


#: Validators by (field mapping, columns), per process: a file's header changes rarely.
_VALIDATORS: dict[tuple[Fields, tuple[str, ...]], RowValidator] = {}


class Preparer:
    """Validation and COPY encoding of the batches of one run of one source.

    Picklable (it is sent to the worker processes); holds no state but its arguments.
    """

    def __init__(self, src: SourceConfig, run_id: int) -> None:
        self.src = src
        self.run_id = run_id

    @property
    def kind(self) -> SourceKind:
        from etlsvc.extract import kind_of  # the registry imports every kind

        return kind_of(self.src)

    def _validator(self, columns: list[str]) -> RowValidator:
        key = (self.src.fields, tuple(columns))
        found = _VALIDATORS.get(key)
        if found is None:
            if len(_VALIDATORS) > 256:
                _VALIDATORS.clear()
            found = _VALIDATORS[key] = RowValidator(columns, self.src.fields)
        return found

    def __call__(self, batch: Batch) -> Prepared:
        kind = self.kind
        validator = self._validator(batch.columns)
        if validator.missing and batch.rows:
            raise SourceError(self.src.name, kind.missing(self.src, batch.stream,
                                                          batch.columns))
        bad = validator.check(batch.rows)
        rejects = batch.rejects
        keep = None
        if bad:
            keep = [True] * len(batch.rows)
            for i, reason in bad.items():
                keep[i] = False
                rejects.append(Reject(batch.stream,
                                      dict(zip(kind.position_keys, batch.positions[i])),
                                      self._original(batch, i), reason))
            rejects.sort(key=lambda r: tuple(r.position.values()))
        rows = batch.rows if keep is None else list(compress(batch.rows, keep))
        key_col = batch.columns.index(self.src.fields.source_id) if batch.rows else 0
        keys = list(map(itemgetter(key_col), rows))
        positions = batch.positions if keep is None else list(compress(batch.positions, keep))
        if batch.records is None:
            records: Iterable[bytes] = raw.encode_records(batch.columns, rows)
        else:
            records = batch.records if keep is None else list(compress(batch.records, keep))
        payload = raw.payload(self.run_id, self.src.name, batch.stream, positions, keys,
                              records, received=batch.records is not None)
        return Prepared(batch.checkpoint or batch.stream, payload, len(rows),
                        len(set(keys)) == len(keys),
                        rejects, batch.rows_read, batch.bytes_read, batch.state,
                        pages=batch.pages, lines=batch.lines_read)

    @staticmethod
    def _original(batch: Batch, i: int) -> Any:
        if batch.records is not None:
            return msgspec.json.decode(batch.records[i])
        return dict(zip(batch.columns, batch.rows[i]))


async def commit(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, run_id: int,
                 batch: Prepared) -> dict[str, int]:
    """One transaction: raw rows, normalized rows, rejects, checkpoint, run counters.

    Returns the batch's counters as committed.
    """
    async with db.failing_fast(conn), conn.transaction():
        mark = await normalize.next_raw_id(conn, kind.raw_table)
        await raw.copy(conn, kind.raw_table, kind.copy_columns, batch.payload)
        inserted, updated = (0, 0)
        if batch.valid:
            inserted, updated = await normalize.upsert(
                conn, src, kind, above=mark, distinct_keys=batch.distinct_keys)
        await raw.insert_rejects(conn, run_id, src.name, batch.rejects)
        await checkpoint.write(conn, src.name, batch.stream, batch.state, run_id)
        counts = batch.counts(inserted, updated)
        await runs.add(conn, run_id, counts)
    return counts


_END = object()


@dataclass
class _Failed:
    exc: Exception


async def prefetch(items: AsyncIterator[Any], depth: int = 1) -> AsyncIterator[Any]:
    """Iterate ``items`` with up to ``depth`` items produced ahead (overlaps CPU and I/O)."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=depth)

    async def produce() -> None:
        try:
            async for item in items:
                await queue.put(item)
            await queue.put(_END)
        except Exception as exc:
            await queue.put(_Failed(exc))

    task = asyncio.create_task(produce())
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
