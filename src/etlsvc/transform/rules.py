"""Data-quality rules per normalized field: declared in config, compiled once.

Owns what a normalized field must be. A source's ``[sources.rules.FIELD]`` table gives the
field a type (``text``, ``number``, ``timestamp``, ``url``, ``enum``, ``array``) and rules
(``required``, ``min``/``max``, ``min_length``/``max_length``, ``regex``, ``allowed``,
``unique``); a field without one has its column's default type (``amount`` a number,
``event_time`` a timestamp, ``tags`` an array, the rest text; ``source_id`` is always
required). One :class:`FieldCheck` per mapped field is compiled from that definition, and
gives:

* the msgspec type a whole batch's cells are converted to in one C call (``validate.py``);
* ``explain``: which rule a flagged value broke, for the reject (rule, field, column, value);
* ``sql``: the expression ``sql/queries/normalize.sql`` casts the raw value with, so the
  database never casts what validation did not check.

``unique`` (no two natural keys of a source share the value) needs the rows already loaded:
it is checked in SQL when a batch commits (``normalize.unique_conflicts``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from typing import Annotated, Any, Literal

import msgspec

from etlsvc.contract import Problem, Rule
from etlsvc.errors import ConfigError

#: The SQL type of each normalized column, and the field types it can take.
_TEXT_TYPES = ("text", "url", "enum", "number", "timestamp")
COLUMN_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "source_id": ("text", _TEXT_TYPES),
    "title": ("text", _TEXT_TYPES),
    "description": ("text", _TEXT_TYPES),
    "category": ("text", _TEXT_TYPES),
    "url": ("text", _TEXT_TYPES),
    "amount": ("numeric", ("number",)),
    "event_time": ("timestamptz", ("timestamp",)),
    "tags": ("text[]", ("array",)),
}
_DEFAULT_TYPE = {"amount": "number", "event_time": "timestamp", "tags": "array"}

#: An absolute http(s) URL with a host and no whitespace.
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#@]+(?:@[^\s/?#]+)?(?:[/?#]\S*)?$"
# Offsets PostgreSQL refuses ("time zone displacement out of range") though RFC 3339 allows.
_BIG_OFFSET = re.compile(r"[+-](?:1[6-9]|[2-9]\d):?\d\d$")
_BIG_OFFSET_ANY = re.compile(r"[+-](?:1[6-9]|[2-9]\d):?\d\d(?=\x1f|$)", re.M)

_TYPE_MESSAGES = {
    "text": "is not text",
    "number": "is not a number",
    "timestamp": "is not an RFC 3339 date-time (like 2024-05-01T12:00:00Z)",
    "url": "is not an absolute http(s) URL",
    "enum": "is not one of the allowed values",
}


@dataclass(frozen=True)
class FieldCheck:
    """The compiled rules of one normalized field (see the module docstring)."""

    field: str
    type: str
    rule: Rule
    separator: str = ";"

    @property
    def required(self) -> bool:
        return self.rule.required or self.field == "source_id"

    @cached_property
    def pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.rule.regex) if self.rule.regex is not None else None

    @property
    def trivial(self) -> bool:
        """Any value passes: nothing to check in Python."""
        r = self.rule
        return (self.type in ("text", "array") and not self.required
                and (r.min_length, r.max_length, r.regex, r.allowed) == (None,) * 4)

    @property
    def needs_post_check(self) -> bool:
        """Rules msgspec cannot express: timestamp bounds and offsets, array items."""
        return self.type in ("timestamp", "array")

    def msgspec_type(self) -> Any:
        """What a cell is converted to in the batch's one msgspec call (blank cells of an
        optional field are hidden from it as None)."""
        r = self.rule
        if self.type == "number":
            meta = msgspec.Meta(ge=r.min, le=r.max)
            base: Any = Annotated[float, meta] if (r.min, r.max) != (None, None) else float
        elif self.type == "timestamp":
            base = dt.datetime
        elif self.type == "enum":
            base = Literal[r.allowed]  # type: ignore[valid-type]
        elif self.type == "array":
            base = str
        else:
            pattern = URL_PATTERN if self.type == "url" else None
            shortest = max(1, r.min_length or 0) if self.required else r.min_length
            lengths = {"min_length": shortest, "max_length": r.max_length}
            metas = [msgspec.Meta(pattern=p) for p in (pattern, r.regex) if p is not None]
            if any(v is not None for v in lengths.values()):
                metas.append(msgspec.Meta(**lengths))
            base = Annotated[(str, *metas)] if metas else str  # type: ignore[valid-type]
        return base if self.required else base | None

    def column_passes(self, values: list[str]) -> bool:
        """A whole column at once (the values of rows msgspec passed, blanks dropped): True
        when none can break the rules msgspec does not check (timestamp offsets and bounds,
        array items); False means: look at each value with ``explain``. Cheap in C, and
        conservative: it may say False of a column whose values all pass, never True of one
        with a value that fails."""
        r = self.rule
        if not values:
            return True
        if self.type == "timestamp":
            if _BIG_OFFSET_ANY.search("\x1f".join(values)):
                return False
            if r.min is None and r.max is None:
                return True
            try:
                parsed = list(map(dt.datetime.fromisoformat, values))
            except ValueError:             # a form msgspec takes and Python does not
                return False
            aware = [d if d.tzinfo else d.replace(tzinfo=dt.UTC) for d in parsed]
            return ((r.min is None or min(aware) >= _aware(r.min))
                    and (r.max is None or max(aware) <= _aware(r.max)))
        # An array: items split at the separator, as the SQL splits them.
        if self.required or r.min_length is not None or any(
                v.startswith("[") for v in values):
            return False
        sep = self.separator
        if r.max_length is not None and max(map(str.count, values, repeat(sep))) >= r.max_length:
            return False                   # at most count + 1 items: maybe too many
        items = set(sep.join(values).split(sep)) - {""}
        if r.allowed is not None and not items <= set(r.allowed):
            return False
        return self.pattern is None or all(map(self.pattern.search, items))

    def explain(self, value: Any, column: str) -> Problem | None:
        """The first rule ``value`` breaks (in the order they are listed), else None."""
        r = self.rule
        blank = value is None or value == ""
        if blank:
            return self._problem("required", column, value, "is required but empty") \
                if self.required else None
        if self.type == "array":
            return self._explain_items(self.items(value), column, value)
        try:
            typed = msgspec.convert(value, _BASE[self.type], strict=False)
        except msgspec.ValidationError:
            return self._problem("type", column, value, _TYPE_MESSAGES[self.type])
        if self.type == "url" and not re.match(URL_PATTERN, value):
            return self._problem("type", column, value, _TYPE_MESSAGES["url"])
        if self.type == "timestamp" and _BIG_OFFSET.search(value.strip()):
            return self._problem("type", column, value, "has a UTC offset beyond ±15:59")
        if self.type in ("number", "timestamp"):
            typed = _aware(typed)
            if r.min is not None and typed < _aware(r.min):
                return self._problem("min", column, value, f"is below the minimum {r.min}")
            if r.max is not None and typed > _aware(r.max):
                return self._problem("max", column, value, f"is above the maximum {r.max}")
            return None
        if self.type == "enum" and value not in (r.allowed or ()):
            return self._problem("allowed", column, value,
                                 f"is not one of the allowed values ({_list(r.allowed)})")
        return self._explain_text(value, column, value)

    def _explain_text(self, text: str, column: str, value: Any) -> Problem | None:
        r = self.rule
        if r.min_length is not None and len(text) < r.min_length:
            return self._problem("min_length", column, value,
                                 f"is shorter than {r.min_length} characters")
        if r.max_length is not None and len(text) > r.max_length:
            return self._problem("max_length", column, value,
                                 f"is longer than {r.max_length} characters")
        if self.pattern is not None and not self.pattern.search(text):
            return self._problem("regex", column, value,
                                 f"does not match the pattern {r.regex!r}")
        if r.allowed is not None and self.type != "enum" and text not in r.allowed:
            return self._problem("allowed", column, value,
                                 f"is not one of the allowed values ({_list(r.allowed)})")
        return None

    def _explain_items(self, items: list[str], column: str, value: Any) -> Problem | None:
        r = self.rule
        if self.required and not items:
            return self._problem("required", column, value, "is required but has no items")
        if r.min_length is not None and len(items) < r.min_length:
            return self._problem("min_length", column, value,
                                 f"has fewer than {r.min_length} items")
        if r.max_length is not None and len(items) > r.max_length:
            return self._problem("max_length", column, value,
                                 f"has more than {r.max_length} items")
        for item in items:
            if self.pattern is not None and not self.pattern.search(item):
                return self._problem("regex", column, value,
                                     f"has an item {item!r} that does not match the pattern "
                                     f"{r.regex!r}")
            if r.allowed is not None and item not in r.allowed:
                return self._problem("allowed", column, value,
                                     f"has an item {item!r} that is not one of the allowed "
                                     f"values ({_list(r.allowed)})")
        return None

    def items(self, value: str) -> list[str]:
        """The items of an array field as the SQL makes them: a JSON array (JSON kinds), or
        one string split at the separator, empty items dropped."""
        if value.startswith("["):
            try:
                decoded = json.loads(value)
            except ValueError:
                decoded = None
            if isinstance(decoded, list):
                return [v if isinstance(v, str) else json.dumps(v) for v in decoded]
        return [v for v in value.split(self.separator) if v]

    def _problem(self, rule: str, column: str, value: Any, message: str) -> Problem:
        return Problem(rule, self.field, column, value, message)

    def sql(self, path: str) -> str:
        """The expression that casts the raw value at ``path`` (a ``text[]`` parameter) to
        the normalized column's type; ``$14`` is the separator of tags given as a string."""
        value = f"record #>> {path}::text[]"
        column_type = COLUMN_TYPES[self.field][0]
        if column_type == "numeric":
            return f"nullif(btrim({value}), '')::numeric"
        if column_type == "timestamptz":
            return f"nullif({value}, '')::timestamptz"
        if column_type == "text[]":
            return (f"CASE jsonb_typeof(record #> {path}::text[])"
                    f" WHEN 'array' THEN ARRAY(SELECT jsonb_array_elements_text("
                    f"record #> {path}::text[]))"
                    f" WHEN 'string' THEN array_remove(string_to_array({value}, $14), '')"
                    " END")
        return value


_BASE: dict[str, Any] = {"text": str, "url": str, "enum": str, "number": float,
                         "timestamp": dt.datetime}


def _aware(value: Any) -> Any:
    """Naive date-times are UTC (as validation and PostgreSQL's session take them)."""
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def _list(values: tuple[str, ...] | None) -> str:
    shown = ", ".join(map(repr, (values or ())[:10]))
    return shown + (", …" if values and len(values) > 10 else "")


def compile_rules(mapped: dict[str, str], rules: dict[str, Rule], separator: str,
                  where: str = "rules") -> dict[str, FieldCheck]:
    """The checks of each mapped field; ConfigError naming the key for a rule that cannot
    hold (``where`` is the rules table's key, like ``sources[0].rules``)."""
    for field in rules:
        if field not in COLUMN_TYPES:
            raise ConfigError(f"{where}.{field}': unknown normalized field (normalized fields "
                              f"are: {', '.join(COLUMN_TYPES)})")
        if field not in mapped:
            raise ConfigError(f"{where}.{field}': the field has rules but is not mapped in "
                              "fields")
    return {field: _compile(field, rules.get(field, Rule()), separator, f"{where}.{field}")
            for field in mapped}


def default_type(field: str) -> str:
    """The type of a normalized field whose rules name none."""
    return _DEFAULT_TYPE.get(field, "text")


def _compile(field: str, rule: Rule, separator: str, where: str) -> FieldCheck:
    column_type, types = COLUMN_TYPES[field]
    kind = rule.type or default_type(field)
    if kind not in types:
        raise ConfigError(f"{where}.type': {field} is stored as {column_type} and cannot be "
                          f"of type {kind!r} (it can be: {', '.join(types)})")
    bounds = [b for b in (rule.min, rule.max) if b is not None]
    if bounds and kind not in ("number", "timestamp"):
        raise ConfigError(f"{where}.min': min and max apply to numbers and timestamps, not "
                          f"to {kind}")
    wanted = float if kind == "number" else dt.datetime
    for key, b in (("min", rule.min), ("max", rule.max)):
        if b is not None and not isinstance(b, wanted):
            raise ConfigError(f"{where}.{key}': a {kind} field needs a "
                              f"{'number' if kind == 'number' else 'date-time'} here, not "
                              f"{b!r}")
    if len(bounds) == 2 and _aware(bounds[0]) > _aware(bounds[1]):
        raise ConfigError(f"{where}.min': min ({rule.min}) is above max ({rule.max})")
    lengths = (rule.min_length, rule.max_length)
    if None not in lengths and lengths[0] > lengths[1]:  # type: ignore[operator]
        raise ConfigError(f"{where}.min_length': min_length ({lengths[0]}) is above "
                          f"max_length ({lengths[1]})")
    if (rule.min_length, rule.max_length, rule.regex) != (None, None, None) and kind in (
            "number", "timestamp", "enum"):
        raise ConfigError(f"{where}': min_length, max_length and regex apply to text, url "
                          f"and array fields, not to {kind}")
    if kind == "enum" and not rule.allowed:
        raise ConfigError(f"{where}.allowed': an enum field needs its allowed values")
    if rule.regex is not None:
        try:
            re.compile(rule.regex)
        except re.error as exc:
            raise ConfigError(f"{where}.regex': not a valid regular expression: {exc}") \
                from None
    if rule.unique and column_type != "text":
        raise ConfigError(f"{where}.unique': unique applies to text fields, not to "
                          f"{field} ({column_type})")
    return FieldCheck(field, kind, rule, separator)
