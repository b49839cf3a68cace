"""pgoutput messages as PostgreSQL writes them (protocol 1, built here byte by byte from the
documented format), decoded; a column's text made the JSON value a record holds; which
transactions a table's snapshot saw (xid wraparound included)."""

from __future__ import annotations

import base64
import datetime as dt
import struct
from decimal import Decimal

import msgspec
import pytest

from etlsvc.extract import pgoutput
from etlsvc.extract.pg_cdc import Snapshot, size_bytes

EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def relation(oid: int, schema: str, name: str, columns: list[tuple[str, int, bool]],
             identity: bytes = b"d") -> bytes:
    out = b"R" + struct.pack("!I", oid) + cstr(schema) + cstr(name) + identity
    out += struct.pack("!h", len(columns))
    for col, type_oid, key in columns:
        out += bytes([1 if key else 0]) + cstr(col) + struct.pack("!Ii", type_oid, -1)
    return out


def tuple_data(*values: object) -> bytes:
    out = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is pgoutput.UNCHANGED:
            out += b"u"
        else:
            raw = str(value).encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


ITEMS = relation(16400, "public", "items", [("id", 20, True), ("name", 25, False),
                                             ("big", 25, False)])


def cache() -> pgoutput.Relations:
    relations = pgoutput.Relations()
    pgoutput.decode(ITEMS, relations)
    return relations


def test_a_relation_message_describes_the_table_and_its_key() -> None:
    relations = pgoutput.Relations()
    rel = pgoutput.decode(ITEMS, relations)
    assert rel.qualified == "public.items" and rel.identity == "d"
    assert [(c.name, c.type_oid, c.key) for c in rel.columns] == [
        ("id", 20, True), ("name", 25, False), ("big", 25, False)]
    assert relations.by_oid[16400] is rel


def test_insert_update_delete_with_nulls_unchanged_toast_and_the_old_row() -> None:
    relations = cache()
    insert = pgoutput.decode(b"I" + struct.pack("!I", 16400) + b"N"
                             + tuple_data("1", "één", None), relations)
    assert insert.op == "insert" and insert.new == {"id": "1", "name": "één", "big": None}
    # An update that left the TOASTed column alone, with replica identity full ('O').
    update = pgoutput.decode(b"U" + struct.pack("!I", 16400) + b"O"
                             + tuple_data("1", "old", "x" * 10) + b"N"
                             + tuple_data("1", "new", pgoutput.UNCHANGED), relations)
    assert update.op == "update" and update.old == {"id": "1", "name": "old", "big": "x" * 10}
    assert update.new["big"] is pgoutput.UNCHANGED and update.new["name"] == "new"
    # Without an old row (the key did not change): old is None.
    plain = pgoutput.decode(b"U" + struct.pack("!I", 16400) + b"N"
                            + tuple_data("2", "b", "c"), relations)
    assert plain.old is None and plain.new == {"id": "2", "name": "b", "big": "c"}
    delete = pgoutput.decode(b"D" + struct.pack("!I", 16400) + b"K"
                             + tuple_data("7", None, None), relations)
    assert delete.op == "delete" and delete.old == {"id": "7", "name": None, "big": None}
    assert delete.relation.qualified == "public.items"


def test_begin_commit_and_truncate() -> None:
    relations = cache()
    pgoutput.decode(relation(16401, "billing", "invoices", [("id", 23, True)]), relations)
    at = 767_000_000_123_456                              # microseconds after 2000-01-01
    begin = pgoutput.decode(b"B" + struct.pack("!qqI", 0x1_0000_0AB0, at, 4_000_000_000),
                            relations)
    assert begin.final_lsn == 0x1_0000_0AB0 and begin.xid == 4_000_000_000
    assert begin.committed_at == EPOCH + dt.timedelta(microseconds=at)
    commit = pgoutput.decode(b"C" + b"\0" + struct.pack("!qqq", 10, 20, at), relations)
    assert (commit.commit_lsn, commit.end_lsn) == (10, 20)
    trunc = pgoutput.decode(b"T" + struct.pack("!iB", 2, 0) + struct.pack("!II", 16400, 16401),
                            relations)
    assert [r.qualified for r in trunc.relations] == ["public.items", "billing.invoices"]
    # Origin, type and logical messages carry nothing for a table.
    assert pgoutput.decode(b"Y" + b"\0" * 8, relations) is None


@pytest.mark.parametrize("data, says", [
    (b"I" + struct.pack("!I", 99) + b"N" + tuple_data("1"), "never described"),
    (b"I" + struct.pack("!I", 16400) + b"N" + struct.pack("!h", 1) + b"t\0\0", "malformed"),
    (b"B\0\0", "malformed"),
    (b"I" + struct.pack("!I", 16400) + b"N" + struct.pack("!h", 1) + b"z", "value kind"),
    (b"Z", "unknown pgoutput message"),
])
def test_a_malformed_message_is_a_decode_error_naming_what(data: bytes, says: str) -> None:
    with pytest.raises(pgoutput.DecodeError, match=says):
        pgoutput.decode(data, cache())


@pytest.mark.parametrize("type_oid, text, value", [
    (20, "9007199254740993", 9007199254740993),        # past a double's integers
    (23, "-5", -5),
    (1700, "1.50", Decimal("1.50")),                      # the scale kept
    (1700, "NaN", "NaN"),
    (701, "Infinity", "Infinity"),
    (701, "1.5e-07", Decimal("1.5e-07")),
    (16, "t", True),
    (16, "f", False),
    (1184, "2024-05-01 12:00:00.5+00", "2024-05-01T12:00:00.5+00:00"),
    (1184, "2024-05-01 12:00:00+05:30", "2024-05-01T12:00:00+05:30"),
    (1114, "2024-05-01 12:00:00", "2024-05-01T12:00:00"),
    (1184, "infinity", "infinity"),
    (1184, "0044-03-15 12:00:00+00 BC", "0044-03-15 12:00:00+00 BC"),
    (17, "\\x00ff10", base64.b64encode(b"\x00\xff\x10").decode()),
    (2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    (1007, "{1,2,3}", "{1,2,3}"),
    (25, None, None),
])
def test_a_columns_text_becomes_the_json_value_a_record_holds(
        type_oid: int, text: str | None, value: object) -> None:
    assert pgoutput.json_value(type_oid, text) == value


def test_json_columns_stay_json_byte_for_byte() -> None:
    raw = pgoutput.json_value(3802, '{"a": [1, 2.50]}')
    assert isinstance(raw, msgspec.Raw)
    assert msgspec.json.encode({"note": raw}) == b'{"note":{"a": [1, 2.50]}}'


def test_a_snapshot_saw_what_committed_before_it_and_not_what_ran_during_it() -> None:
    snap = Snapshot.parse("100:105:101,103")
    assert snap.saw(99) and snap.saw(100) and snap.saw(102) and snap.saw(104)
    assert not snap.saw(101) and not snap.saw(103)        # in progress when it was taken
    assert not snap.saw(105) and not snap.saw(200)        # began after it
    # 64-bit xids past a wraparound: the stream's 32-bit xid is matched near xmax.
    epoch = 3 << 32
    wrapped = Snapshot.parse(f"{epoch - 10}:{epoch + 5}:{epoch + 2}")
    assert wrapped.saw((epoch - 20) & 0xFFFFFFFF)         # before the epoch turned
    assert wrapped.saw((epoch + 1) & 0xFFFFFFFF)
    assert not wrapped.saw((epoch + 2) & 0xFFFFFFFF)
    assert not wrapped.saw((epoch + 6) & 0xFFFFFFFF)


@pytest.mark.parametrize("text, size", [("10GB", 10 << 30), ("512MB", 512 << 20),
                                        ("64kB", 65536), ("1.5 GB", 3 << 29), ("100", 100)])
def test_sizes_read_like_postgresqls(text: str, size: int) -> None:
    assert size_bytes(text) == size


@pytest.mark.parametrize("text", ["", "ten GB", "10 PB", "-1GB", "1e9"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        size_bytes(text)
