"""Validation of records with msgspec, before anything reaches PostgreSQL.

Owns checking a batch's rows against the compiled rules of a source's fields
(``transform/rules.py``): by default ``source_id`` present and not empty, ``amount`` empty
or a number, ``event_time`` empty or an RFC 3339 date-time with an offset PostgreSQL takes,
and whatever ``[sources.rules]`` adds.

Everything the SQL normalization casts has passed these checks, so a batch never fails in
the database because of one bad value. A whole batch is checked with one
``msgspec.convert`` call; when it fails, the error's path gives the failing row and column,
the field's rules say which one the value broke, that row becomes a reject, and checking
goes on after it. Rules msgspec cannot express (timestamp bounds, array items) are checked
after it, only for the fields that have them.
"""

from __future__ import annotations

import re
from functools import lru_cache
from operator import itemgetter
from typing import Any

import msgspec

from etlsvc.contract import Fields, Problem, Rule, SourceConfig
from etlsvc.transform.rules import FieldCheck, compile_rules

_PATH = re.compile(r" - at `\$\[(\d+)\]\[(\d+)\]`$")

#: Rows checked by one msgspec call at most (an error restarts the call after the bad row).
SLICE = 2000


class RowValidator:
    """Checks rows (lists of strings, one per column) against a source's field checks."""

    def __init__(self, columns: list[str], fields: Fields,
                 checks: dict[str, FieldCheck]) -> None:
        self.columns = columns
        self.checks = checks
        index = {name: i for i, name in enumerate(columns)}
        self.checked: dict[int, FieldCheck] = {}          # column index -> field's check
        for field, column in fields.mapped().items():
            if column in index and not checks[field].trivial:
                self.checked[index[column]] = checks[field]
        self.missing = [(f, c) for f, c in fields.mapped().items() if c not in index]
        types = [(f"c{i}", self.checked[i].msgspec_type() if i in self.checked else Any)
                 for i in range(len(columns))]
        self._type = list[msgspec.defstruct("Row", types, array_like=True)]  # type: ignore[misc]
        # Empty cells of optional fields are valid (null): hidden from msgspec as None.
        self._blankable = [i for i, c in self.checked.items() if not c.required]
        self._post = [i for i, c in self.checked.items() if c.needs_post_check]

    def check(self, rows: list[list[Any]]) -> dict[int, Problem]:
        """Validate ``rows``; return {row index: problem} for the rows that fail."""
        bad: dict[int, Problem] = {}
        blanks = self._hide_blanks(rows)
        try:
            start = 0
            while start < len(rows):
                end = min(start + SLICE, len(rows))
                try:
                    msgspec.convert(rows[start:end], self._type, strict=False)
                    start = end
                except msgspec.ValidationError as exc:
                    i, problem = self._explain(exc, rows, start)
                    bad[i] = problem
                    start = i + 1
        finally:
            for i, col in blanks:
                rows[i][col] = ""
        for col in self._post:
            self._post_check(col, rows, bad)
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
                 start: int) -> tuple[int, Problem]:
        m = _PATH.search(str(exc))
        if not m:                                  # not per-cell: should not happen
            return start, Problem("type", "?", "?", None, str(exc))
        i, col = start + int(m.group(1)), int(m.group(2))
        check = self.checked.get(col)
        value = rows[i][col]
        column = self.columns[col]
        problem = check.explain(value, column) if check is not None else None
        # msgspec is the judge; a value it refused that no rule names is of the wrong type.
        return i, problem or Problem("type", check.field if check else column, column, value,
                                     str(exc)[:m.start()])

    def _post_check(self, col: int, rows: list[list[Any]], bad: dict[int, Problem]) -> None:
        check = self.checked[col]
        values = list(map(itemgetter(col), rows))
        passed = ([v for i, v in enumerate(values) if v and i not in bad] if bad
                  else list(filter(None, values)))
        if check.column_passes(passed):      # the whole column at once, usually enough
            return
        column = self.columns[col]
        for i, v in enumerate(values):
            if i not in bad and v:
                problem = check.explain(v, column)
                if problem is not None:
                    bad[i] = problem


#: Validators by (field mapping, columns), per process: a file's header changes rarely.
_VALIDATORS: dict[tuple[Any, ...], RowValidator] = {}


def validator_for(src: SourceConfig, columns: list[str]) -> RowValidator:
    """The validator of rows with ``columns`` under ``src``'s fields and rules, made once per
    process."""
    checks = checks_of(src)
    key = (id(checks), tuple(columns))
    found = _VALIDATORS.get(key)
    if found is None or found.checks is not checks:
        if len(_VALIDATORS) > 256:
            _VALIDATORS.clear()
        found = _VALIDATORS[key] = RowValidator(columns, src.fields, checks)
    return found


def checks_of(src: SourceConfig) -> dict[str, FieldCheck]:
    """The compiled checks of ``src``'s mapped fields (its rules were checked with the
    config), made once per process."""
    return _checks(src.fields, tuple(sorted(src.rules.items())), src.tags_separator)


@lru_cache(maxsize=256)
def _checks(fields: Fields, rules: tuple[tuple[str, Rule], ...],
            separator: str) -> dict[str, FieldCheck]:
    return compile_rules(fields.mapped(), dict(rules), separator)

