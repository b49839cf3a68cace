"""Raw load: the records of a batch, untouched, into the kind's raw table with COPY.

Owns the raw tables' COPY columns and the encoding of a batch for COPY: each record becomes
a JSON object written by msgspec, and the whole batch one text-format COPY payload built
by C code, so no value is escaped or re-encoded one by one in Python. Also owns writing
rejects.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from functools import lru_cache
from itertools import compress, islice, repeat, starmap
from operator import itemgetter
from typing import Any

import asyncpg
import msgspec

from etlsvc import db
from etlsvc.extract.contract import RawBatch, Reject
from etlsvc.extract.csv_files import GIL_SLICE

RAW_TABLES = {"csv": "raw_csv_data", "api": "raw_api_data", "rss": "raw_rss_data"}
CSV_COLUMNS = ("run_id", "source", "file", "line", "byte_offset", "source_key", "record")
API_COLUMNS = ("run_id", "source", "url", "page", "item_index", "source_key", "record")
RSS_COLUMNS = ("run_id", "source", "feed_url", "entry_index", "source_key", "record")
#: Per kind: the raw table's stream column and its position as a jsonb expression (SQL).
RAW_POSITIONS = {
    "csv": ("file", "jsonb_build_object('line', line, 'byte_offset', byte_offset)"),
    "api": ("url", "jsonb_build_object('page', page, 'index', item_index)"),
    "rss": ("feed_url", "jsonb_build_object('entry', entry_index)"),
}

_encode = msgspec.json.encode


@lru_cache(maxsize=64)
def _record_struct(columns: tuple[str, ...]) -> type[msgspec.Struct] | None:
    """A struct whose JSON encoding is the object {column: value} of a CSV row.

    None when msgspec cannot use a column name as a field name (quotes, backslashes or
    control characters in it).
    """
    names = [f"f{i}" for i in range(len(columns))]
    try:
        return msgspec.defstruct("CsvRecord", [(n, str) for n in names],
                                 rename=dict(zip(names, columns)))
    except ValueError:
        return None


def encode_records(columns: list[str], rows: list[list[str]]) -> Iterable[bytes]:
    """JSON objects {column: value} of ``rows``, encoded by msgspec."""
    struct = _record_struct(tuple(columns))
    if struct is None:
        return map(_encode, map(dict, map(zip, repeat(columns), rows)))
    return map(_encode, starmap(struct, rows))


def _copy_text(value: str) -> str:
    """``value`` escaped for COPY's text format."""
    return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def csv_payload(batch: RawBatch, run_id: int, source: str, key_col: int,
                keep: list[bool] | None) -> tuple[bytes, int]:
    """COPY (text format) payload of the kept rows of a CSV batch, and how many rows it holds.

    Every value is encoded by C code (msgspec, bytes formatting). Usually the only escaping
    COPY's text format needs is doubling backslashes, done once on the whole payload: JSON
    has no raw tabs or line breaks and ``find_files`` keeps them out of file names. Only a
    batch with a tab or line break in a key has its values escaped one by one.
    """
    rows = batch.rows if keep is None else list(compress(batch.rows, keep))
    if not rows:
        return b"", 0
    positions = batch.positions if keep is None else list(compress(batch.positions, keep))
    records = encode_records(batch.columns, rows)
    keys: Iterable[str] = map(itemgetter(key_col), rows)
    stream = batch.stream
    keys = list(keys)
    one_by_one = _has_breaks(keys)
    if one_by_one:
        stream, keys = _copy_text(stream), list(map(_copy_text, keys))
        records = (r.replace(b"\\", b"\\\\") for r in records)
    prefix = f"{run_id}\t{source}\t{stream}\t"
    fmt = (prefix.encode().replace(b"%", b"%%") + b"%d\t%d\t%b\t%b\n").__mod__
    lines = map(fmt, zip(map(itemgetter(0), positions), map(itemgetter(1), positions),
                         map(str.encode, keys), records))
    # In slices, so that this thread lets go of the GIL now and then (see csv_files).
    parts = []
    while part := b"".join(islice(lines, GIL_SLICE)):
        parts.append(part)
    payload = b"".join(parts)
    return (payload if one_by_one else payload.replace(b"\\", b"\\\\")), len(rows)


def _has_breaks(keys: list[str]) -> bool:
    joined = "".join(keys)
    return "\t" in joined or "\n" in joined or "\r" in joined


def items_payload(run_id: int, source: str, stream: str, positions: list[tuple[int, ...]],
                  keys: list[str], records: list[bytes]) -> bytes:
    """COPY (text format) payload of JSON items (API page items, feed entries).

    ``positions`` are the values of the position columns of the kind's raw table.
    """
    head = f"{run_id}\t{source}\t{_copy_text(stream)}\t"
    return "".join(
        head + "".join(f"{p}\t" for p in pos) + f"{_copy_text(key)}\t"
        f"{_copy_text(raw.decode())}\n"
        for pos, key, raw in zip(positions, keys, records)).encode()


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
