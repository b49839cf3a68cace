"""Raw load: the records of a batch, untouched, into the kind's raw table with COPY.

Owns the raw tables' COPY columns and the encoding of a batch for COPY: each record becomes
a JSON object written by msgspec, and the whole batch one CSV-format COPY payload written by
the C ``csv`` writer, so no value is escaped or re-encoded by Python code. Also owns writing
rejects.
"""

from __future__ import annotations

import csv
import io
from itertools import compress, repeat
from operator import itemgetter
from typing import Any

import asyncpg
import msgspec

from etlsvc import db
from etlsvc.sources import RawBatch, Reject

RAW_TABLES = {"csv": "raw_csv_data", "api": "raw_api_data", "rss": "raw_rss_data"}
CSV_COLUMNS = ("run_id", "source", "file", "line", "byte_offset", "source_key", "record")

_encode = msgspec.json.encode


def csv_payload(batch: RawBatch, run_id: int, source: str, key_col: int,
                keep: list[bool] | None) -> tuple[bytes, int]:
    """COPY (format csv) payload of the kept rows of a CSV batch, and how many rows it holds."""
    rows = batch.rows if keep is None else list(compress(batch.rows, keep))
    positions = batch.positions if keep is None else list(compress(batch.positions, keep))
    records = map(bytes.decode, map(_encode, map(dict, map(zip, repeat(batch.columns), rows))))
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(zip(
        repeat(run_id), repeat(source), repeat(batch.stream),
        map(itemgetter(0), positions), map(itemgetter(1), positions),
        map(itemgetter(key_col), rows), records))
    return buf.getvalue().encode(), len(rows)


async def copy_raw(conn: asyncpg.Connection, kind: str, columns: tuple[str, ...],
                   payload: bytes) -> None:
    """COPY a prepared payload into the raw table of ``kind``."""
    if payload:
        await conn.copy_to_table(RAW_TABLES[kind], source=io.BytesIO(payload),
                                 columns=list(columns), format="csv")


async def insert_rejects(conn: asyncpg.Connection, run_id: int, source: str,
                         rejects: list[Reject]) -> None:
    """Store rejects with their position, original record and reason."""
    if rejects:
        await conn.executemany(db.query("rejects", "insert"), [
            (run_id, source, r.stream, r.position, _jsonable(r.record), r.reason)
            for r in rejects])


def _jsonable(record: Any) -> Any:
    """The record, with text that JSON/jsonb cannot hold (NUL, lone surrogates) escaped."""
    if isinstance(record, str):
        return record.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()
    if isinstance(record, dict):
        return {_jsonable(k): _jsonable(v) for k, v in record.items()}
    if isinstance(record, list):
        return [_jsonable(v) for v in record]
    return record
