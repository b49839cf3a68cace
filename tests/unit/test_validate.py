"""Validation rules, pinned: what passes, what is rejected and with which reason."""

from __future__ import annotations

import pytest

from etlsvc.contract import Fields
from etlsvc.transform.rules import compile_rules
from etlsvc.transform.validate import RowValidator

COLUMNS = ["id", "price", "when", "note"]
FIELDS = Fields(source_id="id", amount="price", event_time="when", title="note")
CHECKS = compile_rules(FIELDS.mapped(), {}, ";")


def validator(columns: list[str] = COLUMNS) -> RowValidator:
    return RowValidator(columns, FIELDS, CHECKS)


def check(*rows: list[str]) -> dict[int, str]:
    return {i: p.reason for i, p in validator().check([list(r) for r in rows]).items()}


def test_valid_rows_and_blank_cells_pass_and_rows_are_left_untouched() -> None:
    rows = [
        ["a", "12.50", "2024-05-01T12:00:00Z", ""],
        ["b", "", "", "x"],
        ["c", "-3e2", "2024-05-01 12:00:00+05:30", "y"],
        ["d", "7", "2024-05-01T12:00:00", ""],
    ]
    copy = [list(r) for r in rows]
    assert validator().check(rows) == {}
    assert rows == copy  # blank cells are hidden from msgspec only while checking


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (["", "1", "", ""], "source_id (column 'id') is required but empty: ''"),
        (["a", "N/A", "", ""], "amount (column 'price') is not a number: 'N/A'"),
        (["a", "12,50", "", ""], "amount (column 'price') is not a number: '12,50'"),
        (["a", "$19.99", "", ""], "amount (column 'price') is not a number: '$19.99'"),
        (
            ["a", "", "2023-02-30T10:00:00+01:00", ""],
            "event_time (column 'when') is not an RFC 3339 date-time (like 2024-05-01T12:00:00Z): "
            "'2023-02-30T10:00:00+01:00'",
        ),
        (["a", "", "31/12/2023 25:00", ""], "event_time (column 'when') is not an RFC 3339"),
        (
            ["a", "", "2024-01-01T00:00:00-23:00", ""],
            "event_time (column 'when') has a UTC offset beyond ±15:59: "
            "'2024-01-01T00:00:00-23:00'",
        ),
    ],
)
def test_invalid_values_are_rejected_with_the_field_named(row: list[str], reason: str) -> None:
    bad = check(["ok", "1", "", ""], row, ["ok2", "2", "", ""])
    assert list(bad) == [1]
    assert bad[1].startswith(reason)


def test_several_bad_rows_in_one_batch_are_all_found() -> None:
    rows = [[f"k{i}", "1", "", ""] for i in range(1000)]
    for i in (0, 17, 500, 999):
        rows[i][1] = "x"
    rows[250][0] = ""
    bad = validator().check(rows)
    assert sorted(bad) == [0, 17, 250, 500, 999]


def test_a_mapped_column_missing_from_the_header_is_reported() -> None:
    v = validator(["id", "note"])
    assert v.missing == [("amount", "price"), ("event_time", "when")]


def test_the_whole_column_check_never_passes_a_column_with_a_failing_value() -> None:
    """rules.FieldCheck.column_passes is the fast path of the checks msgspec cannot make:
    whenever it says a column passes, every value must pass one by one too."""
    import datetime as dt
    import random

    from etlsvc.contract import Rule

    checks = compile_rules(
        {"event_time": "when", "tags": "tags"},
        {"event_time": Rule(min=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                            max=dt.datetime(2030, 1, 1, tzinfo=dt.UTC)),
         "tags": Rule(max_length=2, allowed=("a", "b", "c"), regex="^[ab]")}, ";")
    rng = random.Random(5)
    stamps = ["2024-05-01T12:00:00Z", "2019-12-31T23:59:59Z", "2030-01-01T00:00:00+00:00",
              "2029-12-31T23:00:00-02:00", "2025-01-01T00:00:00", "2024-01-01 10:00:00+05:30",
              "2024-01-01T00:00:00+16:00"]
    tags = ["a", "a;b", "a;b;a", "c", "b;;a", "a;d", "", "a;"]
    for _ in range(300):
        for field, pool in (("event_time", stamps), ("tags", tags)):
            column = [v for v in rng.choices(pool, k=rng.randint(1, 4)) if v]
            check = checks[field]
            if check.column_passes(column):
                assert all(check.explain(v, field) is None for v in column), column
    assert checks["event_time"].column_passes(["2024-05-01T12:00:00Z", "2025-01-01T00:00:00"])
    assert checks["tags"].column_passes(["a", "a;b", "b"])
