"""Schema drift without a database: shapes, changes, and each policy applied to a batch by
the preparer of a worker (run here in process)."""

from __future__ import annotations

import msgspec
import pytest

from etlsvc.config import Source
from etlsvc.contract import Batch
from etlsvc.errors import SourceError
from etlsvc.load.batches import Preparer
from etlsvc.transform import drift

KNOWN = {"id": "text", "amount": "number", "note": "text"}


def batch() -> Batch:
    # "amount" turns to text in row 2, "extra" is new, "note" is missing.
    return Batch("f.csv", ["id", "amount", "extra"],
                 [["a", "1", "x"], ["b", "2", ""], ["c", "lots", "y"]],
                 [(2, 10), (3, 20), (4, 30)], rows_read=3)


def preparer(policy: str) -> Preparer:
    src = msgspec.convert({"name": "s", "kind": "csv", "path": "f.csv", "schema_drift": policy,
                           "fields": {"source_id": "id"}}, Source)
    return Preparer(src, 1, KNOWN)


def test_a_shape_is_each_column_with_its_type() -> None:
    assert drift.shape_of_rows(["id", "n", "e"], [["a", "1", ""], ["b", "2.5", ""]]) == {
        "id": "text", "n": "number", "e": "unknown"}
    assert drift.shape_of_items([{"a": 1, "b": "x"}, {"a": None, "b": 2}]) == {
        "a": "number", "b": "number|string"}


def test_changes_are_new_missing_and_retyped_columns() -> None:
    shape = drift.shape_of_rows(batch().columns, batch().rows)
    found = {(c.change, c.column) for c in drift.compare(KNOWN, shape)}
    assert found == {("new", "extra"), ("missing", "note"), ("retyped", "amount")}
    # A first run has nothing known: its shape is not drift.
    assert drift.compare({}, shape) == []
    # Under evolve the shape recorded is the batch's: the new type (text takes numbers too)
    # and the new column.
    assert drift.grown(KNOWN, shape) == {"id": "text", "amount": "text", "extra": "text"}


def test_evolve_loads_everything_and_reports_the_changes() -> None:
    prepared = preparer("evolve")(batch())
    assert prepared.valid == 3 and prepared.rejects == []
    assert {c["change"] for c in prepared.drift} == {"new", "missing", "retyped"}
    assert prepared.whole_shape


def test_freeze_fails_the_batch_naming_the_change() -> None:
    with pytest.raises(SourceError, match="new column 'extra'"):
        preparer("freeze")(batch())


def test_discard_row_rejects_the_rows_with_a_value_in_a_changed_column() -> None:
    prepared = preparer("discard_row")(batch())
    assert prepared.valid == 1                 # row b has no value in "extra"
    assert sorted(r.position["line"] for r in prepared.rejects) == [2, 4]
    assert all(r.rule == "drift" for r in prepared.rejects)
    assert not prepared.whole_shape


def test_discard_value_drops_the_values_and_loads_the_rows() -> None:
    prepared = preparer("discard_value")(batch())
    assert prepared.valid == 3 and prepared.rejects == []
    records = [msgspec.json.decode(line.split(b"\t")[6]) for line in
               prepared.payload.splitlines()]
    assert all("extra" not in r for r in records)
    assert [r["amount"] for r in records] == ["1", "2", ""]
