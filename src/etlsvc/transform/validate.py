"""Validation of records with msgspec, before anything reaches PostgreSQL.

Owns the rules a record must pass to be loaded, and the human-readable reason when it does
not. The rules concern the normalized fields a source maps:

* ``source_id``: present and not empty;
* ``amount``: empty, or a number (``12``, ``-3.50``, ``1e3``; no thousands separators or
  currency signs);
* ``event_time``: empty, or an RFC 3339 date-time (``2024-05-01T12:00:00Z``; without an
  offset it is taken as UTC) with a UTC offset within ±15:59 (PostgreSQL's range).

Everything the SQL normalization casts has passed these checks, so a batch never fails in
the database because of one bad value. A whole batch is checked with one
``msgspec.convert`` call; when it fails, the error's path gives the failing row and column,
that row becomes a reject, and checking goes on after it.
"""

from __future__ import annotations

import datetime as dt
import re
from operator import itemgetter
from typing import Annotated, Any

import msgspec

from etlsvc.extract.contract import Fields

_PATH = re.compile(r" - at `\$\[(\d+)\]\[(\d+)\]`$")
# Offsets PostgreSQL refuses ("time zone displacement out of range") though RFC 3339 allows.
_BIG_OFFSET = re.compile(r"[+-](?:1[6-9]|[2-9]\d):?\d\d(?=\x1f|$)", re.M)

#: Rows checked by one msgspec call at most (the parsing thread must let go of the GIL often).
SLICE = 2000

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

_RULES: dict[str, tuple[Any, str]] = {
    "source_id": (NonEmpty, "is empty"),
    "amount": (float | None, "is not a number"),
    "event_time": (dt.datetime | None, "is not an RFC 3339 date-time (like 2024-05-01T12:00:00Z)"),
}


class RowValidator:
    """Checks rows (lists of strings, one per column) against a source's field mapping."""

    def __init__(self, columns: list[str], fields: Fields) -> None:
        self.columns = columns
        index = {name: i for i, name in enumerate(columns)}
        self.checked: dict[int, str] = {}          # column index -> normalized field
        for field, column in fields.mapped().items():
            if field in _RULES and column in index:
                self.checked[index[column]] = field
        self.missing = [(f, c) for f, c in fields.mapped().items() if c not in index]
        types = [(f"c{i}", _RULES[self.checked[i]][0] if i in self.checked else Any)
                 for i in range(len(columns))]
        self._type = list[msgspec.defstruct("Row", types, array_like=True)]  # type: ignore[misc]
        # Empty amount / event_time cells are valid (null): hidden from msgspec as None.
        self._blankable = [i for i, f in self.checked.items() if f != "source_id"]
        self._time_col = next((i for i, f in self.checked.items() if f == "event_time"), None)

    def check(self, rows: list[list[Any]]) -> dict[int, str]:
        """Validate ``rows``; return {row index: reason} for the rows that fail."""
        bad: dict[int, str] = {}
        blanks = self._hide_blanks(rows)
        try:
            start = 0
            while start < len(rows):
                # Windows of SLICE rows: one C call holds the GIL until it returns.
                end = min(start + SLICE, len(rows))
                try:
                    msgspec.convert(rows[start:end], self._type, strict=False)
                    start = end
                except msgspec.ValidationError as exc:
                    i, reason = self._explain(exc, rows, start)
                    bad[i] = reason
                    start = i + 1
        finally:
            for i, col in blanks:
                rows[i][col] = ""
        if self._time_col is not None:
            self._check_offsets(rows, bad)
        return bad

    def _hide_blanks(self, rows: list[list[Any]]) -> list[tuple[int, int]]:
        blanks = []
        for col in self._blankable:
            values = list(map(itemgetter(col), rows))
            if "" in values:
                for i, v in enumerate(values):
                    if v == "":
                        rows[i][col] = None
                        blanks.append((i, col))
        return blanks

    def _explain(self, exc: msgspec.ValidationError, rows: list[list[Any]],
                 start: int) -> tuple[int, str]:
        m = _PATH.search(str(exc))
        if not m:                                  # not per-cell: should not happen
            return start, str(exc)
        i, col = start + int(m.group(1)), int(m.group(2))
        field = self.checked.get(col)
        value = rows[i][col]
        if field is None:
            return i, f"column {self.columns[col]!r}: {str(exc)[:m.start()]}"
        shown = repr(value) if len(str(value)) <= 60 else repr(str(value)[:60]) + "…"
        return i, f"{field} (column {self.columns[col]!r}) {_RULES[field][1]}: {shown}"

    def _check_offsets(self, rows: list[list[Any]], bad: dict[int, str]) -> None:
        assert self._time_col is not None
        col = self._time_col
        values = list(map(itemgetter(col), rows))
        if not _BIG_OFFSET.search("\x1f".join(filter(None, values))):
            return
        for i, v in enumerate(values):
            if i not in bad and v and _BIG_OFFSET.search(v):
                bad[i] = (f"event_time (column {self.columns[col]!r}) has a UTC offset "
                          f"beyond ±15:59: {v!r}")


#: Validators by (field mapping, columns), per process: a file's header changes rarely.
_VALIDATORS: dict[tuple[Fields, tuple[str, ...]], RowValidator] = {}


def validator_for(fields: Fields, columns: list[str]) -> RowValidator:
    """The validator of rows with ``columns`` under ``fields``, made once per process."""
    key = (fields, tuple(columns))
    found = _VALIDATORS.get(key)
    if found is None:
        if len(_VALIDATORS) > 256:
            _VALIDATORS.clear()
        found = _VALIDATORS[key] = RowValidator(columns, fields)
    return found
