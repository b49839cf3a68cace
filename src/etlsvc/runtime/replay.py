"""Replaying a source: its normalized rows made again from its raw rows, in one transaction.

Owns ``etlsvc replay``: after a change of mapping or rules, every raw row of the source is
validated again and goes through the one write path (``load/write.write``) in chunks,
with the raw rows left where they are; normalized rows whose key no raw row produces any
more are deleted at the end. A replay is a run of its own (trigger ``replay``) under the
source's lock, and holds the source's raw lock, so a purge never deletes a raw row it is
reading. If more rows are rejected than the source's ``max_error_rate`` allows, the whole
replay rolls back: a wrong mapping never empties the table. Its SQL is in
``sql/queries/replay.sql``.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog

from etlsvc.config import Source
from etlsvc.contract import COUNTERS, OP_DELETE, Reject
from etlsvc.db import Database
from etlsvc.errors import EtlError, SourceError
from etlsvc.extract import kind_of
from etlsvc.extract.records import project
from etlsvc.load import normalize
from etlsvc.load.write import Stored, add_counts, write
from etlsvc.runtime import retention, runs
from etlsvc.transform.mapping import paths
from etlsvc.transform.validate import validator_for

log = structlog.get_logger()

#: Raw rows read and written per step of the replay's one transaction.
CHUNK = 10_000


async def replay_source(database: Database, src: Source, chunk: int = CHUNK) -> dict[str, Any]:
    """Normalize ``src`` again from its raw rows with the current mapping, in one transaction.

    Raw rows are validated again (a mapping change can make a row invalid: it becomes a
    reject of this run); normalized rows whose key no raw row produces any more are deleted.
    Returns the replay's finished ``etl_runs`` row.
    """
    async with database.pool.acquire() as conn, runs.source_lock(conn, src.name):
        run_id = await runs.start(conn, src.name, src.kind, "replay", False,
                                  database.reconnect_timeout)
        with structlog.contextvars.bound_contextvars(run_id=run_id, source=src.name):
            log.info("replay started")
            counts = dict.fromkeys(COUNTERS, 0)
            error = None
            try:
                async with conn.transaction():
                    # A purge batch must not delete raw rows this replay points at.
                    await retention.lock_raw(conn, src.name, wait=True)
                    await _replay(conn, src, run_id, chunk, counts)
            except (EtlError, OSError) as exc:
                error = str(exc)
            # What was read is counted even when the replay rolled back.
            await add_counts(conn, run_id, counts)
            row = await runs.finish(conn, run_id, "failed" if error else "succeeded", error)
            (log.error if error else log.info)(
                "replay finished", status=row["status"], error=error,
                **{k: row[k] for k in COUNTERS})
            return row


async def _replay(conn: asyncpg.Connection, src: Source, run_id: int, chunk: int,
                  counts: dict[str, int]) -> None:
    kind = kind_of(src)

    def sql(name: str) -> str:
        return normalize.kind_sql("replay", name, kind)

    key_path = paths(src, kind)[0]
    await normalize.ensure_unique_indexes(conn, src)
    await conn.execute(sql("keys_table"))
    last = 0
    first_reason = None
    while True:
        found = await conn.fetch(sql("raw_chunk"), src.name, last, chunk)
        if not found:
            break
        upto = found[-1]["id"]
        skip, rejects = _invalid(src, found)
        written = await write(conn, src, kind, run_id, Stored(last, upto, skip),
                              rejects=rejects)
        skip += [c.raw_id for c in written.conflicts]
        rejects += [c.reject for c in written.conflicts]
        await conn.execute(sql("keep_keys"), src.name, last, upto, key_path, skip)
        first_reason = first_reason or (rejects[0].reason if rejects else None)
        valid = len(found) - len(skip)
        for k, v in (("rows_read", len(found)), ("rows_valid", valid),
                     ("rows_rejected", len(skip)), ("rows_inserted", written.inserted),
                     ("rows_updated", written.updated),
                     ("rows_unchanged", valid - written.inserted - written.updated)):
            counts[k] += v
        last = upto
    if failure := runs.error_rate_exceeded(src, counts):
        example = f"; first reason: {first_reason}" if first_reason else ""
        raise SourceError(src.name, f"replay rolled back: {failure}{example}")
    deleted = await conn.execute(sql("delete_stale"), src.name)
    log.info("stale normalized rows deleted", count=int(deleted.split()[-1]))


def _invalid(src: Source, found: list[Any]) -> tuple[list[int], list[Reject]]:
    """The raw rows of ``found`` that the current mapping and rules reject: their ids, and
    their rejects."""
    kind = kind_of(src)
    skip: list[int] = []
    rejects: list[Reject] = []
    if kind.changes:        # a delete's record is its key: not validated, as when streamed
        found = [r for r in found if r["position"].get("op") != OP_DELETE]
    for columns, group in _by_columns(src, found).items():
        validator = validator_for(src, list(columns))
        rows = project([r["record"] for r in group], list(columns),
                       flat=kind.record == "columns")
        if validator.missing:
            reason = ("mapped column not in the record: " +
                      ", ".join(c for _, c in validator.missing))
            bad = {i: Reject(r["stream"], r["position"], r["record"], reason)
                   for i, r in enumerate(group)}
        else:
            bad = {i: Reject.of(group[i]["stream"], group[i]["position"], group[i]["record"], p)
                   for i, p in validator.check(rows).items()}
        for i, reject in bad.items():
            skip.append(group[i]["id"])
            rejects.append(reject)
    return skip, rejects


def _by_columns(src: Source, found: list[Any]) -> dict[tuple[str, ...], list[Any]]:
    """Raw rows grouped by the columns to validate: a CSV file's header, a JSON kind's
    mapped paths."""
    if kind_of(src).record != "columns":
        return {tuple(dict.fromkeys(src.fields.mapped().values())): found}
    groups: dict[tuple[str, ...], list[Any]] = {}
    for r in found:
        groups.setdefault(tuple(r["record"]), []).append(r)
    return groups
