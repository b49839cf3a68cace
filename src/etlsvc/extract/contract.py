"""Sources: where records come from. One module per kind.

A source turns its input into :class:`RawBatch` objects: parsed records (not yet validated),
their positions, the records it could not even parse (as rejects), the bytes they took, and
the checkpoint state to store once the batch is committed. Adding a kind touches
``sources/``, ``config.py`` (its config struct), ``sql/migrations`` (its raw table) and
``load.py`` (its raw COPY columns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reject:
    """A record that will not be loaded, with where it was and why."""

    stream: str
    position: dict[str, Any]
    record: Any
    reason: str


@dataclass
class RawBatch:
    """Parsed records of one stream, ready for validation; see the module docstring."""

    stream: str
    columns: list[str]
    rows: list[list[Any]]
    #: (line, byte offset) of each row, for CSV; per-kind position tuples otherwise.
    positions: list[tuple[int, int]]
    rejects: list[Reject] = field(default_factory=list)
    rows_read: int = 0
    bytes_read: int = 0
    #: Physical lines the batch covers, for CSV (header, blank and rejected lines included).
    lines_read: int = 0
    state: dict[str, Any] = field(default_factory=dict)
