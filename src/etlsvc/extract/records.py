"""JSON records: the dotted paths fields map, their text as the SQL sees it, and batches.

Every kind whose records are JSON (``api``, ``rss``, ``jsonl``, ``sql``, ``stream``) makes
its batches with ``json_batch``: the record's JSON text goes to the raw table as received,
and the mapped paths, as text, are what validation checks.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from etlsvc.contract import Batch, Reject, SourceConfig
from etlsvc.transform.drift import shape_of_items


def parse_time(value: Any) -> dt.datetime | None:
    """The date-time an RFC 3339 string (or a date-time already) says, as it says it (naive
    when it has no offset); None for anything else. The one parser of upstream times: an
    API's high-water mark and times, a feed's dates."""
    try:
        return msgspec.convert(value, dt.datetime)
    except msgspec.ValidationError:
        return None


def get_path(obj: Any, path: str) -> Any:
    """The value at a dotted path (``a.b.0.c``) in decoded JSON; None where it is absent."""
    if not path:
        return obj
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.lstrip("-").isdigit():
            index = int(part)
            obj = obj[index] if -len(obj) <= index < len(obj) else None
        else:
            return None
    return obj


def text(value: Any) -> str | None:
    """A JSON value as PostgreSQL's ``#>>`` shows it (strings bare, the rest as JSON)."""
    if value is None or isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def project(items: list[Any], columns: list[str], flat: bool = False) -> list[list[str | None]]:
    """Rows for validation: the mapped paths of each item (with ``flat``, its keys: a column
    name may hold a dot), as text (as the SQL sees them)."""
    if flat:
        return [[text(item.get(c)) for c in columns] for item in items]
    return [[text(get_path(item, c)) for c in columns] for item in items]


def json_batch(src: SourceConfig, stream: str, items: list[Any], raws: list[bytes],
               positions: list[tuple[int, ...]], position_keys: tuple[str, ...], *,
               keep: list[bool] | None = None, rejects: list[Reject] | None = None,
               state: dict[str, Any], bytes_read: int, pages: int = 0, lines: int = 0,
               checkpoint: str | None = None, flat: bool = False) -> Batch:
    """A batch of decoded JSON records (``items``) and their text as received (``raws``).

    ``keep`` drops records before they are even read (already loaded); a record that is not
    a JSON object becomes a reject. ``flat``: fields name the records' keys, not paths.
    """
    columns = list(dict.fromkeys(src.fields.mapped().values()))
    rejects = list(rejects or [])
    kept = []
    for i, item in enumerate(items):
        if keep is not None and not keep[i]:
            continue
        reason = ("the record is not a JSON object" if not isinstance(item, dict) else
                  unstorable(item) if b"\\u" in raws[i] else None)
        if reason is None:
            kept.append(i)
        else:
            rejects.append(Reject(stream, dict(zip(position_keys, positions[i])), item,
                                  reason))
    objects = [items[i] for i in kept]
    return Batch(stream, columns, project(objects, columns, flat),
                 [positions[i] for i in kept], [raws[i] for i in kept], rejects,
                 rows_read=len(kept) + len(rejects),
                 bytes_read=bytes_read, lines_read=lines, pages=pages, state=state,
                 checkpoint=checkpoint, shape=shape_of_items(objects))


def unstorable(value: Any) -> str | None:
    """Why PostgreSQL's jsonb cannot hold ``value`` (a NUL character or a lone surrogate in
    a string, which JSON can escape), else None."""
    if isinstance(value, str):
        if "\x00" in value:
            return "the record holds a NUL character (\\u0000), which jsonb cannot store"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "the record holds a lone UTF-16 surrogate, which jsonb cannot store"
        return None
    if isinstance(value, dict):
        return next(filter(None, map(unstorable, [*value.keys(), *value.values()])), None)
    if isinstance(value, list):
        return next(filter(None, map(unstorable, value)), None)
    return None
