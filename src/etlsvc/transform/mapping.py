"""A source's field mapping as the normalization SQL takes it: no I/O.

Owns turning a source's ``fields`` and compiled rules into the parameters of
``sql/queries/normalize.sql``: the JSON path of each normalized field in the raw record, and
the cast of each value (``FieldCheck.sql``), so the database casts exactly what validation
checked. ``load/normalize.py`` runs the SQL.
"""

from __future__ import annotations

from etlsvc.contract import NORMALIZED_FIELDS, Rule, SourceConfig, SourceKind
from etlsvc.transform.rules import FieldCheck, default_type
from etlsvc.transform.validate import checks_of


def paths(src: SourceConfig, kind: SourceKind) -> list[list[str] | None]:
    """JSON path of each normalized field in the raw record (dotted for JSON kinds)."""
    mapped = src.fields.mapped()
    out: list[list[str] | None] = []
    for field in NORMALIZED_FIELDS:
        name = mapped.get(field)
        if name is None:
            out.append(None)
        else:
            out.append([name] if kind.record == "columns" else name.split("."))
    return out


def values_sql(src: SourceConfig, keep_absent: bool = False) -> str:
    """The casts of title … event_time from the raw record, in normalize.sql's parameter
    order ($7 …), made by the compiled rules of each field (its column's default when the
    field is not mapped).

    ``keep_absent`` (a change kind): a mapped column the record lacks (an update that did
    not send an unchanged TOASTed value) keeps the value ``normalized_data`` has; the
    lookup runs only for such a record."""
    checks = checks_of(src)
    mapped = src.fields.mapped()
    out = []
    for j, field in enumerate(NORMALIZED_FIELDS[1:]):
        param = f"${7 + j}"
        cast = (checks.get(field) or FieldCheck(field, default_type(field), Rule())).sql(param)
        if keep_absent and field in mapped:
            cast = (f"CASE WHEN record ? ({param}::text[])[1] THEN {cast} ELSE (SELECT "
                    f"c.{field} FROM normalized_data c WHERE c.source = $1 AND "
                    "c.source_id = key) END")
        out.append(cast)
    return ",\n           ".join(out)


def unique_fields(src: SourceConfig) -> list[str]:
    """The normalized fields whose rules say ``unique``."""
    return [c.field for c in checks_of(src).values() if c.rule.unique]
