"""The one write path: every transaction that changes ``normalized_data`` from raw rows.

Owns the order of a write, the same for a batch of a run, a chunk of a reject retry and a
chunk of a replay (``write``):

1. COPY the rows into the kind's raw table (a replay's rows are there already);
2. the ``unique`` rules: a row whose value another key holds is a conflict; rows this
   transaction copied leave the raw table (a reject is never in it);
3. the upsert into ``normalized_data`` of the rest (a backfill's batch: the rows it left
   alone leave the raw table); for a change kind, the TRUNCATEs before it, and after it the
   deletes and the end of a table's snapshot (``sweep``);
4. the rejects, with the conflicts (a retry marks its own rejects instead: ``rejects=None``);
5. after the stream's previous batch has committed (``previous``), the data version.

``commit`` is a batch of a run: ``write``, then its checkpoint, the shape it showed and the
run's counters, in one transaction — all or nothing, so a checkpoint is never ahead of the
data. Every statement is in ``sql/queries/``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import asyncpg

from etlsvc import db
from etlsvc.contract import COUNTERS, Prepared, Reject, SourceConfig, SourceKind
from etlsvc.load import checkpoint, normalize, raw, shapes


@dataclass(frozen=True)
class Copied:
    """Rows to COPY into the raw table first (a batch, a retry's records)."""

    payload: bytes
    #: Rows in the payload (0: nothing to normalize).
    rows: int
    #: No two rows share a natural key (the upsert skips its dedupe sort).
    distinct_keys: bool = False


@dataclass(frozen=True)
class Stored:
    """Raw rows already stored: ids ``above < id <= upto`` of the source, but ``skip``."""

    above: int
    upto: int
    skip: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Conflict:
    """A row that broke a ``unique`` rule: its raw id, its index in the payload (Copied),
    and its reject."""

    raw_id: int
    index: int | None
    reject: Reject


@dataclass
class Written:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    conflicts: list[Conflict] = field(default_factory=list)


async def write(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, run_id: int,
                rows: Copied | Stored, *, rejects: list[Reject] | None,
                unique_checks: bool = True,
                previous: asyncio.Task[None] | None = None,
                clear: list[str] | None = None,
                sweep: list[tuple[str, int]] | None = None,
                read_point: str | None = None) -> Written:
    """Steps 1–5 of the module docstring, inside the caller's transaction.

    ``rejects``: inserted with the conflicts (None: neither; the caller records the
    conflicts). ``unique_checks`` False: the caller knows the source has no unique rule.
    ``previous``: the commit of the stream's batch before; if it failed, this raises and
    the caller's transaction rolls back. ``clear``, ``sweep``: a change kind's TRUNCATEs
    and finished snapshots, ``read_point`` a backfill's (``contract.Batch``).
    """
    written = Written()
    if (clear or sweep) and previous is not None:
        # They look at the rows earlier batches wrote: those must be committed first.
        await asyncio.shield(previous)
        previous = None
    if clear:
        written.deleted += await normalize.clear(conn, src, kind, clear)
    if isinstance(rows, Copied):
        above = await normalize.next_raw_id(conn, kind.raw_table)
        await raw.copy(conn, kind.raw_table, kind.copy_columns, rows.payload)
        upto, skip, this_transaction, left = db.MAX_ID, [], True, rows.rows
    else:       # how many rows the range holds is not known: there may be some
        above, upto, skip, this_transaction, left = rows.above, rows.upto, rows.skip, False, None
    if left != 0 and unique_checks:
        found = await normalize.unique_conflicts(conn, src, kind, above=above, upto=upto,
                                                 skip=skip, this_transaction=this_transaction)
        if found:
            copied = isinstance(rows, Copied)
            index = ({raw_id: i for i, raw_id in enumerate(
                await normalize.copied_ids(conn, src, kind, above))} if copied else {})
            taken = await normalize.as_rejects(conn, kind, found, take=copied)
            written.conflicts = [Conflict(raw_id, index.get(raw_id), reject)
                                 for raw_id, reject in taken.items()]
            skip = [*skip, *taken]
            left = None if left is None else left - len(taken)
    if left != 0:
        written.inserted, written.updated = await normalize.upsert(
            conn, src, kind, above=above, upto=upto, skip=skip, this_transaction=this_transaction,
            distinct_keys=isinstance(rows, Copied) and rows.distinct_keys,
            read_point=read_point)
        if read_point is not None and isinstance(rows, Copied):
            await normalize.drop_unseen(conn, src, kind, above=above, read_point=read_point)
    if rejects is not None:
        await raw.insert_rejects(conn, run_id, src.name,
                                 [*rejects, *(c.reject for c in written.conflicts)])
    for stream, snapshot in sweep or ():      # after the rejects: a rejected key stays
        written.deleted += await normalize.sweep(conn, src, kind, stream, snapshot, run_id)
    if previous is not None:
        await asyncio.shield(previous)    # raises if it failed: this one rolls back
    if kind.changes and left != 0:
        # After the batch before has committed: a delete's trigger raises the data version,
        # and a batch holding that row lock while it waits for the one before, which
        # needs the lock too, would wait for ever (PostgreSQL cannot see the cycle).
        written.deleted += await normalize.delete_gone(
            conn, src, kind, above=above, upto=upto, skip=skip,
            this_transaction=this_transaction)
    # Last, so that concurrent batches of a source queue on its row lock in one order.
    # (A delete raised it in its trigger already.)
    if written.inserted or written.updated:
        await normalize.bump_version(conn, src, kind)
    return written


async def commit(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind, run_id: int,
                 batch: Prepared, previous: asyncio.Task[None] | None = None,
                 checkpoints: str | None = None) -> dict[str, int]:
    """One batch of a run in one transaction: ``write``, then the checkpoint, the shape and
    the run's counters (after ``previous``, in this order). Returns the batch's counters.
    ``checkpoints``: the key the run's checkpoints are kept under (a backfill's; default
    the source's name).

    A transaction the database rolls back to break a deadlock (an operator's transaction
    that locks the same rows in another order) or for a serialization failure is done again:
    nothing of it was kept, so the batch goes again from its checkpoint, in the same run."""
    return await db.again_if_transient(
        lambda: _commit_once(conn, src, kind, run_id, batch, previous, checkpoints),
        f"a batch of {src.name} ({batch.stream})")


async def _commit_once(conn: asyncpg.Connection, src: SourceConfig, kind: SourceKind,
                       run_id: int, batch: Prepared,
                       previous: asyncio.Task[None] | None,
                       checkpoints: str | None) -> dict[str, int]:
    async with db.failing_fast(conn), conn.transaction():
        written = await write(conn, src, kind, run_id,
                              Copied(batch.payload, batch.valid, batch.distinct_keys),
                              rejects=batch.rejects, unique_checks=batch.unique_checks,
                              previous=previous, clear=batch.clear, sweep=batch.sweep,
                              read_point=batch.read_point)
        await checkpoint.write(conn, checkpoints or src.name, batch.stream, batch.state,
                               run_id)
        await shapes.record(conn, src.name, batch.stream, run_id, batch.shape,
                            batch.whole_shape)
        if written.conflicts:
            batch = replace(batch, valid=batch.valid - len(written.conflicts),
                            rejects=[*batch.rejects, *(c.reject for c in written.conflicts)])
        counts = batch.counts(written.inserted, written.updated, written.deleted)
        await add_counts(conn, run_id, counts)
    return counts


async def add_counts(conn: asyncpg.Connection, run_id: int, counts: dict[str, int]) -> None:
    """Add to the run's counters (inside the transaction that did what they count)."""
    await conn.execute(db.query("runs", "add"), run_id, *(counts.get(c, 0) for c in COUNTERS))
