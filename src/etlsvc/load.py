"""Raw load: the records of a batch, untouched, into the kind's raw table with COPY.

Owns the raw tables' COPY columns and the encoding of a batch for COPY: each record becomes
a JSON object written by msgspec, and the whole batch one text-format COPY payload built
by C code, so no value is escaped or re-encoded one by one in Python. Also owns writing
rejects.
"""

from __future__ import annotations

import io
from functools import lru_cache
from itertools import compress, starmap
from operator import itemgetter
from typing import Any

import asyncpg
import msgspec

from etlsvc import db
from etlsvc.sources import RawBatch, Reject

RAW_TABLES = {"csv": "raw_csv_data", "api": "raw_api_data", "rss": "raw_rss_data"}
CSV_COLUMNS = ("run_id", "source", "file", "line", "byte_offset", "source_key", "record")

_encode = msgspec.json.encode


@lru_cache(maxsize=64)
def record_struct(columns: tuple[str, ...]) -> type[msgspec.Struct]:
    """A struct whose JSON encoding is the object {column: value} of a CSV row."""
    names = [f"f{i}" for i in range(len(columns))]
    return msgspec.defstruct("CsvRecord", [(n, str) for n in names],
                             rename=dict(zip(names, columns)))


def csv_payload(batch: RawBatch, run_id: int, source: str, key_col: int,
                keep: list[bool] | None) -> tuple[bytes, int]:
    """COPY (text format) payload of the kept rows of a CSV batch, and how many rows it holds.

    Every value is encoded by C code (msgspec, bytes formatting). The only escaping COPY's
    text format needs is doubling backslashes, done once on the whole payload: JSON has no
    raw tabs or line breaks, validation keeps them out of keys, and ``find_files`` out of
    file names.
    """
    rows = batch.rows if keep is None else list(compress(batch.rows, keep))
    if not rows:
        return b"", 0
    positions = batch.positions if keep is None else list(compress(batch.positions, keep))
    records = map(_encode, starmap(record_struct(tuple(batch.columns)), rows))
    keys = map(str.encode, map(itemgetter(key_col), rows))
    prefix = f"{run_id}\t{source}\t{batch.stream}\t".encode().replace(b"%", b"%%")
    fmt = (prefix + b"%d\t%d\t%b\t%b\n").__mod__
    payload = b"".join(map(fmt, zip(map(itemgetter(0), positions),
                                    map(itemgetter(1), positions), keys, records)))
    return payload.replace(b"\\", b"\\\\"), len(rows)


async def copy_raw(conn: asyncpg.Connection, kind: str, columns: tuple[str, ...],
                   payload: bytes) -> None:
    """COPY a prepared payload into the raw table of ``kind``."""
    if payload:
        await conn.copy_to_table(RAW_TABLES[kind], source=io.BytesIO(payload),
                                 columns=list(columns), format="text")


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
