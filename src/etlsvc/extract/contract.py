"""The source contract: what a kind of source implements, once, and what it hands on.

A kind (``csv``, ``api``, ``rss``, ``jsonl``, ``sql``, …) is one module of ``extract/`` with
one :class:`SourceKind` subclass, registered in ``extract/__init__.py``. It declares:

* its config struct (a :class:`SourceConfig` tagged with the kind's name);
* its raw table: the column naming the stream (a file, a URL, a table) and the position
  columns that say where in the stream a record was (integers, in the table's order);
* whether its records are flat columns (CSV: fields map column names) or JSON (fields map
  dotted paths);
* ``batches``: an async iterator of :class:`Batch` objects made ready for the database by
  the one batch path (``load/batches.py``), each with the checkpoint state to store once it
  is committed.

Everything after that — validation, COPY into the raw table, normalization, rejects, the
checkpoint, the run's counters — is the same code for every kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import msgspec

from etlsvc.transform.rules import Problem, Rule

if TYPE_CHECKING:
    from etlsvc.load.batches import Prepared, Preparer
    from etlsvc.load.checkpoint import Checkpoints
    from etlsvc.runtime.workers import Workers

#: The columns of ``normalized_data`` a source can map its fields to.
NORMALIZED_FIELDS = (
    "source_id", "title", "description", "category", "amount", "url", "tags", "event_time",
)

SourceName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
OneChar = Annotated[str, msgspec.Meta(min_length=1, max_length=1)]


class Fields(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which source field feeds each normalized column (None: the column stays null)."""

    source_id: str | None = None
    title: str | None = None
    description: str | None = None
    category: str | None = None
    amount: str | None = None
    url: str | None = None
    tags: str | None = None
    event_time: str | None = None

    def mapped(self) -> dict[str, str]:
        """The normalized fields that are mapped, with their source field."""
        return {f: v for f in NORMALIZED_FIELDS if (v := getattr(self, f)) is not None}


class AnomalyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[sources.anomaly]``: how a finished run is compared with the source's recent runs
    (``runtime/anomalies.py``)."""

    enabled: bool = True
    #: Successful runs the comparison looks back on.
    window: Annotated[int, msgspec.Meta(ge=3, le=1000)] = 20
    #: Runs needed before anything is judged.
    min_runs: Annotated[int, msgspec.Meta(ge=3, le=1000)] = 5
    #: Robust z-score above which a metric is anomalous.
    threshold: Annotated[float, msgspec.Meta(gt=0)] = 3.5


class SourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True,
                   tag_field="kind"):
    """What every source has; a kind's config struct adds its own keys and ``fields``."""

    name: SourceName
    schedule: str | None = None
    #: Share of rejected records above which a run fails.
    max_error_rate: Rate = 0.05
    #: Separator of the tags field when it is one string.
    tags_separator: str = ";"
    fields: Fields = Fields()
    #: Data-quality rules per normalized field (``transform/rules.py``).
    rules: dict[str, Rule] = {}
    anomaly: AnomalyConfig = AnomalyConfig()
    #: Days raw rows and rejects are kept (None: for ever); a raw row a normalized row
    #: points at is kept whatever its age (``runtime/retention.py``).
    retention_days: Annotated[float, msgspec.Meta(gt=0)] | None = None
    #: What a new, missing or retyped column does (``transform/drift.py``).
    schema_drift: Literal["evolve", "freeze", "discard_row", "discard_value"] = "evolve"

    kind: ClassVar[str]


@dataclass
class Reject:
    """A record that will not be loaded, with where it was and why."""

    stream: str
    position: dict[str, Any]
    record: Any
    reason: str
    #: For a value that broke a rule: the rule, the normalized field, the source's column
    #: (or path) and the value.
    rule: str | None = None
    field: str | None = None
    column: str | None = None
    value: Any = None

    @classmethod
    def of(cls, stream: str, position: dict[str, Any], record: Any,
           problem: Problem) -> Reject:
        """The reject of a record whose value broke a rule."""
        return cls(stream, position, record, problem.reason, problem.rule, problem.field,
                   problem.column, problem.value)


@dataclass
class Batch:
    """Records of one stream, parsed but not validated, in the one shape every kind makes.

    ``rows`` hold one value per column: for a kind with flat records, the record's own
    columns; for JSON kinds, the text of each mapped path (see ``json_values``), while
    ``records`` keep each record's JSON exactly as received for the raw table.
    """

    stream: str
    columns: list[str]
    rows: list[list[Any]]
    #: Values of the kind's position columns, one tuple per row.
    positions: list[tuple[int, ...]]
    #: JSON text of each record as received; None: the record is {column: value} of its row.
    records: list[bytes] | None = None
    #: Records that could not even be parsed.
    rejects: list[Reject] = field(default_factory=list)
    rows_read: int = 0
    bytes_read: int = 0
    #: Physical lines the batch covers, for line-based files (blank and rejected included).
    lines_read: int = 0
    pages: int = 0
    #: The stream's checkpoint state once this batch is committed.
    state: dict[str, Any] = field(default_factory=dict)
    #: The checkpoint's stream, when not ``stream`` (an API's pages share one walk).
    checkpoint: str | None = None
    #: JSON kinds: the records' top-level keys with their types (transform/drift.py).
    shape: dict[str, str] = field(default_factory=dict)


@dataclass
class Extraction:
    """What a kind's ``batches`` gets for one run of one source."""

    src: Any
    run_id: int
    #: Where each stream resumes ({stream: state}; ``.mine``: streams this run committed).
    checkpoints: Checkpoints
    #: The config file's directory: relative paths are relative to it.
    base_dir: Path
    #: The process pool for CPU-bound parsing (created once by the runtime).
    workers: Workers
    #: Batch → Prepared: validation and COPY encoding (``load/batches.py``).
    preparer: Preparer
    #: Report a problem that does not fail the run (it lands in the run's notes).
    warn: Callable[[str], None]
    #: Record the bytes the run will read in all (for progress).
    set_total: Callable[[int], Awaitable[None]]
    #: Add to the run's notes (a JSON object, merged).
    notes: dict[str, Any] = field(default_factory=dict)
    #: For a continuous kind under ``serve``: set when the service stops (the kind then
    #: ends its batches). None: consume what is there and end (``etlsvc run``).
    stopping: asyncio.Event | None = None
    #: Streams of the source read at once at most (the files of a glob).
    parallel_streams: int = 1

    async def prepare(self, batch: Batch) -> Prepared:
        """``preparer(batch)`` in a worker process."""
        return await self.workers.run(self.preparer, batch)


class SourceKind:
    """A kind of source. Subclasses set the class attributes and implement ``batches``."""

    #: The ``kind`` of a source in config.toml, in ``etl_runs`` and ``normalized_data``.
    name: ClassVar[str]
    config: ClassVar[type[SourceConfig]]
    raw_table: ClassVar[str]
    #: The raw table's column naming the stream (file, URL, table, subject).
    stream_column: ClassVar[str]
    #: The raw table's position columns, and their names in a reject's position.
    position_columns: ClassVar[tuple[str, ...]]
    position_keys: ClassVar[tuple[str, ...]]
    #: ``columns``: fields map column names of flat records; ``paths``: dotted JSON paths.
    record: ClassVar[Literal["columns", "paths"]] = "paths"
    #: A continuous kind runs as a long-lived task in ``serve``, not per run.
    continuous: ClassVar[bool] = False

    def check_config(self, src: Any, where: str) -> None:
        """Raise ConfigError (``where`` names the source's key) for what types cannot say."""

    def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        """The source's batches from its checkpoints on, ready for the database."""
        raise NotImplementedError

    async def check(self, src: Any, base_dir: Path) -> str:
        """What ``etlsvc check`` says of the source; SourceError if it cannot be read."""
        raise NotImplementedError

    def missing(self, src: Any, stream: str, columns: list[str]) -> str:
        """The reason a batch fails when mapped columns are not among ``columns``."""
        absent = ", ".join(f"{c!r} (for {f})" for f, c in src.fields.mapped().items()
                           if c not in columns)
        return f"{stream}: column {absent} not in the record (columns: {', '.join(columns)})"

    @property
    def position_sql(self) -> str:
        """SQL building a raw row's position as a reject holds it (a JSON object)."""
        return "jsonb_build_object(" + ", ".join(
            f"'{k}', {c}" for k, c in zip(self.position_keys, self.position_columns)) + ")"

    @property
    def copy_columns(self) -> tuple[str, ...]:
        """The raw table's columns a batch is copied into, in payload order."""
        return ("run_id", "source", self.stream_column, *self.position_columns,
                "source_key", "record")
