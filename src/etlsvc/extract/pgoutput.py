"""PostgreSQL's logical replication messages (``pgoutput``, protocol version 1), decoded.

Owns turning the bytes of ``pg_logical_slot_peek_binary_changes`` into Python objects
(:func:`decode`), and a column's text (the type's output function, as pgoutput sends it
and as a snapshot's ``::text`` reads it) into the JSON value a record holds
(:func:`json_value`): both paths of ``pg_cdc`` make byte-identical records of one row, so a
snapshot row and the same row streamed later are never a phantom update or a schema change.

Format: https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html.
No I/O, no state but the caller's relation cache.
"""

from __future__ import annotations

import base64
import datetime as dt
import struct
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

#: PostgreSQL's epoch for commit timestamps (microseconds since 2000-01-01 UTC).
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

#: A column whose value did not change and was not sent (an unchanged TOASTed value).
UNCHANGED = object()

_I16, _I32, _U32, _I64 = struct.Struct("!h"), struct.Struct("!i"), struct.Struct("!I"), \
    struct.Struct("!q")


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    #: Part of the replica identity (the key an UPDATE or DELETE names the row by).
    key: bool


@dataclass(frozen=True)
class Relation:
    """A table as the stream describes it (sent before its first change, and again after
    each change of its schema)."""

    oid: int
    schema: str
    name: str
    #: ``d`` default (the primary key), ``n`` nothing, ``f`` full, ``i`` an index.
    identity: str
    columns: tuple[Column, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    committed_at: dt.datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    committed_at: dt.datetime


@dataclass(frozen=True)
class Change:
    """An insert, update or delete of one row: ``new`` (insert, update) and ``old`` (the
    key or, with replica identity full, the whole old row; update, delete) as
    {column: text or None or UNCHANGED}."""

    op: str                       # "insert" | "update" | "delete"
    relation: Relation
    new: dict[str, Any] | None = None
    old: dict[str, Any] | None = None


@dataclass(frozen=True)
class Truncate:
    relations: tuple[Relation, ...]


@dataclass
class Relations:
    """The relations the stream has described so far, by oid (the caller keeps it for the
    whole read: a change names its table by oid only)."""

    by_oid: dict[int, Relation] = field(default_factory=dict)


class DecodeError(ValueError):
    """A message that is not pgoutput protocol 1 (or names a relation never described)."""


def decode(data: bytes, relations: Relations) -> Any:
    """One message: a Begin, Commit, Relation, Change or Truncate, or None for the kinds
    that carry nothing for a table (origin, type, logical message)."""
    tag = data[:1]
    try:
        if tag == b"B":
            (lsn,), (ts,), (xid,) = (_I64.unpack_from(data, 1), _I64.unpack_from(data, 9),
                                     _U32.unpack_from(data, 17))
            return Begin(lsn, timestamp(ts), xid)
        if tag == b"C":
            (commit,), (end,), (ts,) = (_I64.unpack_from(data, 2), _I64.unpack_from(data, 10),
                                        _I64.unpack_from(data, 18))
            return Commit(commit, end, timestamp(ts))
        if tag == b"R":
            rel = _relation(data)
            relations.by_oid[rel.oid] = rel
            return rel
        if tag in (b"I", b"U", b"D"):
            return _change(tag, data, relations)
        if tag == b"T":
            (count,) = _I32.unpack_from(data, 1)
            oids = [_U32.unpack_from(data, 6 + 4 * i)[0] for i in range(count)]
            return Truncate(tuple(_known(relations, oid) for oid in oids))
        if tag in (b"O", b"Y", b"M"):
            return None
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed pgoutput message {tag!r}: {exc}") from None
    raise DecodeError(f"unknown pgoutput message {tag!r}")


def timestamp(micros: int) -> dt.datetime:
    """A commit timestamp of the protocol (microseconds since 2000-01-01 UTC)."""
    return _PG_EPOCH + dt.timedelta(microseconds=micros)


def begin_fields(data: bytes) -> tuple[int, int]:
    """A Begin message's (xid, commit timestamp in microseconds): what the reader needs of
    it, without the objects :func:`decode` makes (one per source transaction)."""
    if len(data) < 21 or data[:1] != b"B":
        raise DecodeError(f"malformed pgoutput message {data[:1]!r}: not a Begin")
    return _U32.unpack_from(data, 17)[0], _I64.unpack_from(data, 9)[0]


def commit_end_lsn(data: bytes) -> int:
    """A Commit message's end LSN (the position after the transaction)."""
    if len(data) < 26 or data[:1] != b"C":
        raise DecodeError(f"malformed pgoutput message {data[:1]!r}: not a Commit")
    return _I64.unpack_from(data, 10)[0]


def _string(data: bytes, at: int) -> tuple[str, int]:
    end = data.index(b"\0", at)
    return data[at:end].decode(), end + 1


def _relation(data: bytes) -> Relation:
    (oid,) = _U32.unpack_from(data, 1)
    schema, at = _string(data, 5)
    name, at = _string(data, at)
    identity = chr(data[at])
    (ncols,) = _I16.unpack_from(data, at + 1)
    at += 3
    columns = []
    for _ in range(ncols):
        flags = data[at]
        col, at = _string(data, at + 1)
        (type_oid,) = _U32.unpack_from(data, at)
        at += 8                                 # type oid, type modifier
        columns.append(Column(col, type_oid, bool(flags & 1)))
    return Relation(oid, schema or "pg_catalog", name, identity, tuple(columns))


def _known(relations: Relations, oid: int) -> Relation:
    try:
        return relations.by_oid[oid]
    except KeyError:
        raise DecodeError(f"a change of relation {oid}, which the stream never "
                          "described") from None


def _change(tag: bytes, data: bytes, relations: Relations) -> Change:
    (oid,) = _U32.unpack_from(data, 1)
    rel = _known(relations, oid)
    at = 5
    old = new = None
    if tag == b"I":
        new, at = _tuple(rel, data, at + 1)          # 'N'
        return Change("insert", rel, new=new)
    if data[at:at + 1] in (b"K", b"O"):
        old, at = _tuple(rel, data, at + 1)
    if tag == b"U":
        new, at = _tuple(rel, data, at + 1)          # 'N'
        return Change("update", rel, new=new, old=old)
    return Change("delete", rel, old=old)


def _tuple(rel: Relation, data: bytes, at: int) -> tuple[dict[str, Any], int]:
    (ncols,) = _I16.unpack_from(data, at)
    at += 2
    out: dict[str, Any] = {}
    for i in range(ncols):
        kind = data[at:at + 1]
        at += 1
        name = rel.columns[i].name if i < len(rel.columns) else f"column{i + 1}"
        if kind == b"n":
            out[name] = None
        elif kind == b"u":
            out[name] = UNCHANGED
        elif kind in (b"t", b"b"):
            (length,) = _I32.unpack_from(data, at)
            out[name] = data[at + 4:at + 4 + length].decode()
            at += 4 + length
        else:
            raise DecodeError(f"unknown tuple value kind {kind!r}")
    return out, at


# The type OIDs whose text becomes something other than a JSON string.
_BOOL, _BYTEA, _INTS, _FLOATS, _NUMERIC, _JSON = 16, 17, {20, 21, 23, 26}, {700, 701}, 1700, \
    {114, 3802}
_TIMESTAMP, _TIMESTAMPTZ = 1114, 1184


def json_value(type_oid: int, value: str | None) -> Any:
    """A column's text (its type's output function, with ``DateStyle = ISO`` and ``TimeZone
    = UTC``) as a record holds it: numbers, booleans and JSON as JSON, timestamps in RFC
    3339, bytea in base64, everything else (arrays, uuid, intervals …) as its text."""
    if value is None:
        return None
    if type_oid in _INTS:
        return int(value)
    if type_oid == _NUMERIC or type_oid in _FLOATS:
        try:
            number = Decimal(value)
        except InvalidOperation:
            return value
        return number if number.is_finite() else value   # NaN, Infinity: as text
    if type_oid == _BOOL:
        return value == "t"
    if type_oid in _JSON:
        return msgspec.Raw(value.encode())
    if type_oid in (_TIMESTAMP, _TIMESTAMPTZ):
        return _rfc3339(value)
    if type_oid == _BYTEA and value.startswith("\\x"):
        return base64.b64encode(bytes.fromhex(value[2:])).decode()
    return value


def _rfc3339(value: str) -> str:
    """``2024-01-02 10:00:00.5+00`` (ISO DateStyle) → ``2024-01-02T10:00:00.5+00:00``;
    infinity and BC dates stay as they are."""
    if len(value) < 19 or value[10] != " " or value.endswith(" BC"):
        return value
    out = value[:10] + "T" + value[11:]
    if len(out) >= 3 and out[-3] in "+-" and out[-2:].isdigit():
        out += ":00"                         # "+00" → "+00:00"
    return out
