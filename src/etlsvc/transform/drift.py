"""Schema drift: the columns (CSV) or top-level keys (JSON kinds) a batch has, compared with
what the source has shown before, and the source's policy applied.

Owns a batch's *shape* — each column or key with a type — and what changed against the
source's known shape (``etl_schema_columns``, read when a run starts and written with each
batch by ``load/shapes.py``: this module does no I/O):

* ``new``: a column or key the source never had;
* ``missing``: a known one that no record of the batch has;
* ``retyped``: a known one whose values are now of another type.

Types: for JSON, the JSON types of the values (``string``, ``number``, ``boolean``,
``object``, ``array``, joined by ``|`` when a key has several; nulls say nothing); for CSV,
``number`` when every sampled non-empty value is one, else ``text`` (which takes numbers
too). Types are read from a sample of up to 100 values per column and batch, so a lone odd
value deep in a batch is a validation matter, not drift. A column is retyped when it shows a
type its known ones do not include; under ``evolve`` the known types grow to include it. The
first run of a source sets its shape without drift; a batch without records is not compared.

The policy (``schema_drift`` of the source):

* ``evolve`` (default): load on, the raw table keeps everything, the change is a warning and
  becomes part of the known shape;
* ``freeze``: the run fails before loading the batch;
* ``discard_row``: a record with a value in a new column, or a retyped value, is a reject
  (rule ``drift``);
* ``discard_value``: those values are dropped from the record (a new CSV column leaves the
  record; a retyped CSV value becomes empty), the rest loads.

Under ``freeze`` and the discard policies a change is not accepted into the known shape: it
is found again in the next run, until the policy or the data changes. Mapped columns are
never discarded: rules judge them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import msgspec

Policy = Literal["evolve", "freeze", "discard_row", "discard_value"]
#: A type that says nothing (no value seen): never a change.
UNKNOWN = "unknown"
SAMPLE = 100


@dataclass(frozen=True)
class Change:
    """One column's drift in one stream."""

    change: Literal["new", "missing", "retyped"]
    column: str
    type: str
    was: str | None = None

    def describe(self, stream: str) -> str:
        if self.change == "new":
            return f"{stream}: new column {self.column!r} ({self.type})"
        if self.change == "missing":
            return f"{stream}: column {self.column!r} is missing"
        return f"{stream}: column {self.column!r} changed type from {self.was} to {self.type}"

    def as_note(self, stream: str) -> dict[str, Any]:
        return {"stream": stream, "change": self.change, "column": self.column,
                "type": self.type, **({"was": self.was} if self.was else {})}


def json_type(value: Any) -> str | None:
    """The JSON type of a decoded value (None for null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "array"


def shape_of_items(items: list[dict[str, Any]]) -> dict[str, str]:
    """The top-level keys of JSON objects with their types (see the module docstring)."""
    keys: set[str] = set().union(*items)
    shape = {}
    for key in keys:
        found = (json_type(item.get(key)) for item in items if key in item)
        shape[key] = "|".join(sorted(set(filter(None, islice(found, SAMPLE))))) or UNKNOWN
    return shape


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def shape_of_rows(columns: list[str], rows: list[list[Any]]) -> dict[str, str]:
    """The columns of CSV rows with their types (see the module docstring)."""
    shape = {}
    for i, column in enumerate(columns):
        sample = list(islice((r[i] for r in rows if r[i]), SAMPLE))
        shape[column] = (UNKNOWN if not sample else
                         "number" if all(map(_is_number, sample)) else "text")
    return shape


def compare(known: dict[str, str], shape: dict[str, str]) -> list[Change]:
    """What changed in ``shape`` against ``known`` (nothing when nothing is known yet)."""
    if not known:
        return []
    changes = [Change("new", c, t) for c, t in shape.items() if c not in known]
    changes += [Change("missing", c, t) for c, t in known.items() if c not in shape]
    changes += [Change("retyped", c, t, known[c]) for c, t in shape.items()
                if c in known and not _within(t, known[c])]
    return changes


def _within(found: str, known: str) -> bool:
    """Whether the types ``found`` are among the ``known`` ones (CSV text takes numbers)."""
    if UNKNOWN in (found, known) or known == "text":
        return True
    return set(found.split("|")) <= set(known.split("|"))


def grown(known: dict[str, str], shape: dict[str, str]) -> dict[str, str]:
    """The shape to record under ``evolve``: known types grown by the ones found."""
    out = {}
    for column, found in shape.items():
        was = known.get(column)
        if was is None or was == UNKNOWN or _within(was, found):
            out[column] = found
        elif found == UNKNOWN or _within(found, was):
            out[column] = was
        else:
            out[column] = "|".join(sorted(set(was.split("|")) | set(found.split("|"))))
    return out


def _fits(value: Any, type_: str, json: bool) -> bool:
    """Whether one value is of ``type_`` (empty values fit anything)."""
    if json:
        found = json_type(value)
        return found is None or found in type_.split("|")
    return not value or type_ != "number" or _is_number(value)


def affected(changes: list[Change], columns: list[str], rows: list[list[Any]],
             records: list[dict[str, Any]] | None) -> dict[int, list[Change]]:
    """Rows that hold a value the changes concern, by index: a non-empty value in a new
    column, a value of another type in a retyped one. ``records``: decoded JSON records
    (None for CSV rows)."""
    hits: dict[int, list[Change]] = {}
    for change in changes:
        if change.change == "missing":
            continue
        if records is not None:
            for i, rec in enumerate(records):
                if change.column in rec and (
                        change.change == "new" or not _fits(rec[change.column], change.was or
                                                             "", True)):
                    hits.setdefault(i, []).append(change)
        else:
            col = columns.index(change.column)
            for i, row in enumerate(rows):
                value = row[col]
                if value and (change.change == "new" or not _fits(value, change.was or "",
                                                                   False)):
                    hits.setdefault(i, []).append(change)
    return hits


def drop_values(record: dict[str, Any], changes: list[Change]) -> bytes:
    """A JSON record without the values the changes concern, encoded again."""
    return msgspec.json.encode({k: v for k, v in record.items()
                                if k not in {c.column for c in changes}})
