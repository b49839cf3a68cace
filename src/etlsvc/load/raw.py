"""Raw load: the records of a batch, untouched, into the kind's raw table with COPY.

Owns the encoding of a batch for COPY: each record becomes
a JSON object written by msgspec, and the whole batch one text-format COPY payload built
by C code, so no value is escaped or re-encoded one by one in Python. Also owns writing
rejects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from itertools import chain, repeat, starmap
from typing import Any

import asyncpg
import msgspec

from etlsvc import db
from etlsvc.contract import Reject

_encode = msgspec.json.encode
#: What jsonb cannot hold: NUL, and lone surrogates (bytes not valid in the encoding).
_UNSAFE = re.compile("[\x00\ud800-\udfff]")


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


def _copy_bytes(value: bytes) -> bytes:
    """``_copy_text`` of a record's bytes."""
    return (value.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n")
            .replace(b"\r", b"\\r"))


def payload(run_id: int, source: str, stream: str | list[str],
            positions: list[tuple[int, ...]], keys: list[str], records: Iterable[bytes], *,
            received: bool = False) -> bytes:
    """COPY (text format) payload of a batch's kept rows: run, source, stream, positions,
    key and record per row (``stream``: one for all, or each row's own).

    Every value is encoded by C code (bytes formatting of tuples zipped in C). Usually the
    only escaping COPY's text format needs is doubling backslashes, done once on the whole
    payload: JSON written by msgspec has no raw tabs or line breaks, and ``find_files`` keeps
    them out of file names. Records as ``received`` (JSON text from upstream, which may be
    pretty-printed), and keys or streams with a tab or line break, are escaped one by one.
    """
    if not keys:
        return b""
    records = list(records)
    if isinstance(stream, list):
        return _payload_per_stream(run_id, source, stream, positions, keys, records)
    one_by_one = (_has_breaks([stream, *keys]) or
                  (received and _has_breaks_bytes(records)))
    if one_by_one:
        stream, keys = _copy_text(stream), list(map(_copy_text, keys))
        records = list(map(_copy_bytes, records))
    width = len(positions[0])
    prefix = f"{run_id}\t{source}\t{stream}\t".encode().replace(b"%", b"%%")
    fmt = (prefix + b"%d\t" * width + b"%b\t%b\n").__mod__
    lines = map(fmt, zip(*zip(*positions), map(str.encode, keys), records))
    out = b"".join(lines)
    return out if one_by_one else out.replace(b"\\", b"\\\\")


def _payload_per_stream(run_id: int, source: str, streams: list[str],
                        positions: list[tuple[int, ...]], keys: list[str],
                        records: list[bytes]) -> bytes:
    """``payload`` with each row's stream (a change kind's table), every value escaped (a
    ``json`` column's text keeps its line breaks)."""
    width = len(positions[0])
    prefix = f"{run_id}\t{_copy_text(source)}\t".encode().replace(b"%", b"%%")
    fmt = (prefix + b"%b\t" + b"%d\t" * width + b"%b\t%b\n").__mod__
    streams_b = [_copy_text(s).encode() for s in streams]
    keys_b = [_copy_text(k).encode() for k in keys]
    return b"".join(map(fmt, zip(streams_b, *zip(*positions), keys_b,
                                 map(_copy_bytes, records))))


def _has_breaks(texts: list[str]) -> bool:
    joined = "".join(texts)
    return "\t" in joined or "\n" in joined or "\r" in joined


def _has_breaks_bytes(records: list[bytes]) -> bool:
    joined = b"".join(records)
    return b"\t" in joined or b"\n" in joined or b"\r" in joined


async def copy(conn: asyncpg.Connection, table: str, columns: tuple[str, ...],
               payload: bytes) -> None:
    """COPY a prepared payload into a raw table."""
    if payload:
        # A buffer, not a file around it: asyncpg reads a file in a thread, through a
        # class it makes per call, and that class's cycle keeps the payload alive until the
        # next garbage collection (RSS grew by every batch until then). Not the bytes
        # themselves either: asyncpg takes bytes for a file name.
        await conn.copy_to_table(table, source=memoryview(payload), columns=list(columns),
                                 format="text")


async def insert_rejects(conn: asyncpg.Connection, run_id: int, source: str,
                         rejects: list[Reject]) -> None:
    """Store rejects with their position, original record and reason, in one statement."""
    if rejects:
        await conn.execute(
            db.query("rejects", "insert"), run_id, source, [r.stream for r in rejects],
            [db.json_text(r.position) for r in rejects],
            [None if r.record is None else db.json_text(_jsonable(r.record)) for r in rejects],
            [r.reason for r in rejects], [r.rule for r in rejects],
            [r.field for r in rejects], [r.column for r in rejects],
            [None if r.value is None else _jsonable(str(r.value)) for r in rejects])


def _jsonable(record: Any) -> Any:
    """The record, with text that JSON/jsonb cannot hold (NUL, lone surrogates) escaped."""
    if isinstance(record, str):
        return record.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()
    if isinstance(record, dict):
        if _clean_strings(record):
            return record   # the usual reject (a CSV row): checked in one regex search
        return {_jsonable(k): _jsonable(v) for k, v in record.items()}
    if isinstance(record, list):
        return [_jsonable(v) for v in record]
    return record


def _clean_strings(record: dict[str, Any]) -> bool:
    """Whether ``record`` maps strings to strings that jsonb can hold as they are."""
    try:
        text = "".join(chain(record, record.values()))
    except TypeError:                   # a value that is not a string: look closer
        return False
    return not _UNSAFE.search(text)
