"""The one batch path: a :class:`Batch` of any kind → prepared → committed.

``Preparer`` (in a worker process: pure CPU) validates a batch's rows, turns the failures
into rejects and encodes the rest as one COPY payload for the kind's raw table.
``Committer`` (on the event loop) commits a run's prepared batches, several at once, each
stream's in order, each in one transaction by ``load/write.commit``.
"""

from __future__ import annotations

import asyncio
import zlib
from array import array
from collections.abc import Awaitable, Callable, Iterable
from itertools import compress
from operator import itemgetter
from typing import Any

import asyncpg
import msgspec

from etlsvc import db
from etlsvc.contract import Batch, Prepared, Problem, Reject, SourceConfig, SourceKind
from etlsvc.db import Database
from etlsvc.errors import SourceError
from etlsvc.extract import kind_of
from etlsvc.load import raw, write
from etlsvc.transform import drift
from etlsvc.transform.mapping import unique_fields
from etlsvc.transform.validate import validator_for


class Preparer:
    """Validation and COPY encoding of the batches of one run of one source.

    Picklable (it is sent to the worker processes); holds no state but its arguments.
    """

    def __init__(self, src: SourceConfig, run_id: int,
                 known: dict[str, str] | None = None) -> None:
        self.src = src
        self.run_id = run_id
        #: The source's known shape for schema drift (None: no drift check, as in a retry).
        self.known = known

    @property
    def kind(self) -> SourceKind:
        return kind_of(self.src)

    def __call__(self, batch: Batch) -> Prepared:
        # A batch without records (an empty page, only rejects) says nothing of the shape.
        changes, shape = (self.check_drift(batch) if self.known is not None and batch.rows
                          else ([], {}))
        prepared = self.prepare(batch, self.check(batch))
        prepared.shape = shape
        prepared.drift = [c.as_note(batch.stream) for c in changes]
        prepared.whole_shape = not changes or self.src.schema_drift == "evolve"
        return prepared

    def check_drift(self, batch: Batch) -> tuple[list[drift.Change], dict[str, str]]:
        """The batch's schema drift against the known shape, with the source's policy
        applied to ``batch`` (transform/drift.py); the changes and the shape to record."""
        assert self.known is not None
        json = batch.records is not None
        shape = batch.shape if json else drift.shape_of_rows(batch.columns, batch.rows)
        changes = drift.compare(self.known, shape)
        policy = self.src.schema_drift
        if not changes or policy == "evolve":
            return changes, drift.grown(self.known, shape)
        if policy == "freeze":
            raise SourceError(self.src.name, 'schema drift (schema_drift = "freeze"): ' +
                              "; ".join(c.describe(batch.stream) for c in changes))
        # Not accepted: the shape recorded keeps what was known.
        accepted = {c: self.known.get(c, t) for c, t in shape.items()
                    if c in self.known}
        mapped = {c.split(".")[0] if json else c for c in self.src.fields.mapped().values()}
        acting = [c for c in changes if c.column not in mapped and c.change != "missing"]
        records = ([msgspec.json.decode(r) for r in batch.records]
                   if json and acting and batch.records is not None else None)
        hits = drift.affected(acting, batch.columns, batch.rows, records)
        if policy == "discard_row":
            self._drop_rows(batch, hits)
        elif records is not None and batch.records is not None:
            for i, found in hits.items():
                batch.records[i] = drift.drop_values(records[i], found)
        else:
            self._drop_csv_values(batch, acting, hits)
        return changes, accepted

    def _drop_rows(self, batch: Batch, hits: dict[int, list[drift.Change]]) -> None:
        if not hits:
            return
        for i, found in hits.items():
            what = ", ".join(f"{c.column!r} ({c.change})" for c in found)
            batch.rejects.append(Reject(
                batch.stream, dict(zip(self.kind.position_keys, batch.positions[i])),
                self._original(batch, i),
                f"schema drift: a value in column {what} (schema_drift = \"discard_row\")",
                "drift", None, found[0].column, None))
        keep = [i not in hits for i in range(len(batch.rows))]
        batch.rows = list(compress(batch.rows, keep))
        batch.positions = list(compress(batch.positions, keep))
        if batch.records is not None:
            batch.records = list(compress(batch.records, keep))
        if batch.row_streams is not None:
            batch.row_streams = list(compress(batch.row_streams, keep))
        if batch.unchecked is not None:
            batch.unchecked = list(compress(batch.unchecked, keep))

    @staticmethod
    def _drop_csv_values(batch: Batch, acting: list[drift.Change],
                         hits: dict[int, list[drift.Change]]) -> None:
        for change in acting:
            col = batch.columns.index(change.column)
            if change.change == "retyped":
                for i, found in hits.items():
                    if change in found:
                        batch.rows[i][col] = ""
        new = {batch.columns.index(c.column) for c in acting if c.change == "new"}
        if new:
            batch.columns = [c for i, c in enumerate(batch.columns) if i not in new]
            batch.rows = [[v for i, v in enumerate(row) if i not in new] for row in batch.rows]

    def check(self, batch: Batch) -> dict[int, Problem]:
        """The rows of ``batch`` that break a rule, by index; SourceError when a mapped
        column is not in the batch at all."""
        validator = validator_for(self.src, batch.columns)
        if validator.missing and batch.rows:
            raise SourceError(self.src.name, self.kind.missing(self.src, batch.stream,
                                                               batch.columns))
        bad = validator.check(batch.rows)
        if bad and batch.unchecked is not None:
            # A delete needs only its key; a column an update did not send keeps its value.
            unchecked = batch.unchecked
            bad = {i: p for i, p in bad.items()
                   if unchecked[i] is not None and p.column not in unchecked[i]}
        return bad

    def prepare(self, batch: Batch, bad: dict[int, Problem]) -> Prepared:
        """``batch`` without its ``bad`` rows (which become rejects), encoded for COPY."""
        kind = self.kind
        rejects = batch.rejects
        keep = None
        streams = batch.row_streams
        if bad:
            keep = [True] * len(batch.rows)
            for i, problem in bad.items():
                keep[i] = False
                rejects.append(Reject.of(batch.stream if streams is None else streams[i],
                                         dict(zip(kind.position_keys, batch.positions[i])),
                                         self._original(batch, i), problem))
            rejects.sort(key=lambda r: tuple(r.position.values()))
        rows = batch.rows if keep is None else list(compress(batch.rows, keep))
        key_col = batch.columns.index(self.src.fields.source_id) if batch.rows else 0
        keys = list(map(itemgetter(key_col), rows))
        positions = batch.positions if keep is None else list(compress(batch.positions, keep))
        if batch.records is None:
            records: Iterable[bytes] = raw.encode_records(batch.columns, rows)
        else:
            records = batch.records if keep is None else list(compress(batch.records, keep))
        if streams is not None and keep is not None:
            streams = list(compress(streams, keep))
        payload = raw.payload(self.run_id, self.src.name,
                              batch.stream if streams is None else streams, positions, keys,
                              records, received=batch.records is not None)
        hashes = set(map(zlib.crc32, map(str.encode, keys)))
        unique = unique_fields(self.src)
        for name in unique if rows else ():
            # Batches sharing a unique value commit one after the other, as for a key.
            col = batch.columns.index(self.src.fields.mapped()[name])
            hashes.update(zlib.crc32(f"{name}\0{v}".encode()) for v in map(itemgetter(col), rows))
        return Prepared(batch.checkpoint or batch.stream, payload, len(rows),
                        len(set(keys)) == len(keys),
                        rejects, batch.rows_read, batch.bytes_read, batch.state,
                        pages=batch.pages, lines=batch.lines_read, part=batch.stream,
                        key_hashes=array("I", hashes).tobytes(), unique_checks=bool(unique),
                        clear=batch.clear, sweep=batch.sweep,
                        read_point=batch.read_point)

    @staticmethod
    def _original(batch: Batch, i: int) -> Any:
        if batch.records is not None:
            return msgspec.json.decode(batch.records[i])
        return dict(zip(batch.columns, batch.rows[i]))


class Committer:
    """Commits the prepared batches of one run: up to ``width`` at once, each on its own
    connection (the run's, then more from the pool), each stream's in order.

    A batch does its heavy work (COPY, normalization, rejects) at once; before its checkpoint
    and counters it waits for the commit of the stream's previous batch, and rolls back if
    that one failed: a checkpoint is never ahead of the data. Batches that share a natural
    key never run at the same time (one would wait for the other's row locks while that
    one waits for it). ``on_commit`` gets each batch and its counters once committed.
    """

    def __init__(self, database: Database, conn: asyncpg.Connection, src: SourceConfig,
                 kind: SourceKind, run_id: int, width: int,
                 on_commit: Callable[[Prepared, dict[str, int]], Awaitable[None]],
                 checkpoints: str | None = None) -> None:
        self.database = database
        #: The key of the run's checkpoints (a backfill's; None: the source's name).
        self.checkpoints = checkpoints
        self.src = src
        self.kind = kind
        self.run_id = run_id
        self.width = max(1, width)
        self.on_commit = on_commit
        self._idle: list[asyncpg.Connection] = [conn]
        self._borrowed: list[asyncpg.Connection] = []
        self._last: dict[str, asyncio.Task[None]] = {}
        self._flying: dict[asyncio.Task[None], set[int]] = {}

    async def submit(self, batch: Prepared) -> None:
        """Start committing ``batch`` (waiting for a free slot); the first failure so far is
        raised here."""
        self._raise_failure()
        while len(self._flying) >= self.width:
            await asyncio.wait(self._flying, return_when=asyncio.FIRST_COMPLETED)
            self._raise_failure()
        keys = set(memoryview(batch.key_hashes).cast("I"))
        for task, other in list(self._flying.items()):
            if not keys.isdisjoint(other):
                await asyncio.wait([task])
        self._raise_failure()
        previous = self._last.get(batch.stream)
        task = asyncio.create_task(self._commit(batch, previous))
        self._last[batch.stream] = task
        self._flying[task] = keys
        task.add_done_callback(self._forget_committed)

    def _forget_committed(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._flying.pop(task, None)

    def _raise_failure(self) -> None:
        for task in self._flying:
            if task.done() and (task.cancelled() or task.exception()):
                raise task.exception() or asyncio.CancelledError()

    async def close(self) -> None:
        """Wait for every batch in flight; give back the borrowed connections; raise the
        first failure."""
        try:
            if self._flying:
                await asyncio.wait(self._flying)
            self._raise_failure()
        finally:
            for conn in self._borrowed:
                await self.database.pool.release(conn)
            self._borrowed.clear()

    async def _connection(self) -> asyncpg.Connection:
        if self._idle:
            return self._idle.pop()
        conn = await self.database.pool.acquire()
        self._borrowed.append(conn)
        await db.commit_async(conn)         # as on the run's connection
        return conn

    async def _commit(self, batch: Prepared, previous: asyncio.Task[None] | None) -> None:
        try:
            conn = await self._connection()
            try:
                counts = await write.commit(conn, self.src, self.kind, self.run_id, batch,
                                            previous, self.checkpoints)
            finally:
                self._idle.append(conn)
            await self.on_commit(batch, counts)
        except BaseException as exc:
            if batch.committed is not None and not batch.committed.done():
                batch.committed.set_exception(
                    exc if isinstance(exc, Exception) else asyncio.CancelledError())
                batch.committed.exception()     # retrieved: the run's error is raised
            raise
        if batch.committed is not None and not batch.committed.done():
            batch.committed.set_result(None)
