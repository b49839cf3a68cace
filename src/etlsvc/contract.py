"""The shared vocabulary at the bottom of etlsvc: what every floor above speaks.

Owns the shapes that cross the layers (``ARCHITECTURE.md``, "Floors"): a source's config
(:class:`SourceConfig`, :class:`Fields`, :class:`Rule`), what a kind of source hands on
(:class:`Batch`, :class:`Reject`, :class:`Problem`), what the batch path makes of it
(:class:`Prepared`), where a run resumes (:class:`Checkpoints`), a run's counters
(:data:`COUNTERS`), and the Protocols of the worker pool and the preparer that a kind is
handed in its :class:`Extraction`. It imports nothing of etlsvc but ``errors``; the code
that gives these shapes life lives above it (``transform/``, ``extract/``, ``load/``,
``runtime/``).

The source contract, in short: what a kind of source implements, once, and what it hands on.

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
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar

import msgspec

from etlsvc.errors import BackfillError

T = TypeVar("T")

#: The columns of ``normalized_data`` a source can map its fields to.
NORMALIZED_FIELDS = (
    "source_id", "title", "description", "category", "amount", "url", "tags", "event_time",
)

#: What a source's name, and a tenant's, may be.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
SourceName = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
#: The tenant of sources and API keys that name none.
DEFAULT_TENANT = "default"
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
OneChar = Annotated[str, msgspec.Meta(min_length=1, max_length=1)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
# Every number in the config has an upper bound: a value no deployment means (a timeout of
# 1e308 s, a batch of 10^20 rows) is a typo, and left in it fails far from the key, as an
# OverflowError or a MemoryError, instead of as one line naming it.
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
BatchSize = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
#: Bytes of one record or response: at most 4 GiB.
ByteLimit = Annotated[int, msgspec.Meta(ge=1, le=4 << 30)]
#: Seconds something may take (a timeout): more than 0, at most a day.
Timeout = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
#: Seconds to wait (a backoff, a lag): 0 or more, at most a day.
Delay = Annotated[float, msgspec.Meta(ge=0, le=86_400)]
#: Days to keep something: at most a hundred years.
Days = Annotated[float, msgspec.Meta(gt=0, le=36_500)]
#: A bound of a rule: any finite number.
Finite = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]
FieldType = Literal["text", "number", "timestamp", "url", "enum", "array"]

#: A run's counters, as ``etl_runs`` holds them (each batch adds its own).
COUNTERS = ("rows_read", "rows_valid", "rows_rejected", "rows_inserted", "rows_updated",
            "rows_unchanged", "bytes_read", "pages_read", "lines_read", "rows_deleted")

#: A change kind's ``op`` position: what happened to the row (a snapshot's rows are inserts).
OP_INSERT, OP_UPDATE, OP_DELETE = 1, 2, 3


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[sources.rules.FIELD]``: what a normalized field must be (compiled by
    ``transform/rules.py``)."""

    type: FieldType | None = None
    #: Empty or absent values are rejected (``source_id`` is always required).
    required: bool = False
    #: Bounds of a number, or of a timestamp (an RFC 3339 date-time).
    min: Finite | dt.datetime | None = None
    max: Finite | dt.datetime | None = None
    #: Characters of text, items of an array.
    min_length: NonNegative | None = None
    max_length: NonNegative | None = None
    #: A regular expression the value (each item of an array) must contain a match of;
    #: anchor it with ^…$ to match the whole value.
    regex: str | None = None
    #: The values the field may take (``enum``; each item of an array).
    allowed: tuple[str, ...] | None = None
    #: No two natural keys of the source share a value (checked when a batch commits).
    unique: bool = False


@dataclass(frozen=True)
class Problem:
    """Why a value is rejected: the rule it broke, where, and a sentence for people."""

    rule: str
    field: str
    column: str
    value: Any
    message: str

    @property
    def reason(self) -> str:
        if self.value is None:
            return f"{self.field} (column {self.column!r}) {self.message}"
        shown = repr(self.value) if len(str(self.value)) <= 60 else (
            repr(str(self.value)[:60]) + "…")
        return f"{self.field} (column {self.column!r}) {self.message}: {shown}"


class Fields(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which source field feeds each normalized column (None: the column stays null)."""

    source_id: NonEmpty | None = None
    title: NonEmpty | None = None
    description: NonEmpty | None = None
    category: NonEmpty | None = None
    amount: NonEmpty | None = None
    url: NonEmpty | None = None
    tags: NonEmpty | None = None
    event_time: NonEmpty | None = None

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
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 3.5


#: The record fields a share or a key can leave out (``GET /data``'s, less its ids).
RECORD_FIELDS = ("title", "description", "category", "amount", "url", "tags", "event_time")


class ShareConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[sources.share]``: the tenants the dataset is published to (read-only, through
    ``/data``, ``/data/changes`` and ``/catalog``) and the record fields they see (none
    given: all)."""

    tenants: list[SourceName]
    fields: list[Literal[RECORD_FIELDS]] | None = None  # type: ignore[valid-type]


class SourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True,
                   tag_field="kind"):
    """What every source has; a kind's config struct adds its own keys and ``fields``."""

    name: SourceName
    #: The tenant that owns the source and its rows, raw rows, rejects, runs, versions and
    #: changes: only its keys (and those of tenants it shares the source with) read them.
    tenant: SourceName = DEFAULT_TENANT
    #: What the dataset is, for the catalog (``GET /catalog``).
    description: str | None = None
    #: Words the catalog lists the dataset under.
    tags: list[NonEmpty] = []
    #: Other tenants the dataset is published to.
    share: ShareConfig | None = None
    schedule: NonEmpty | None = None
    #: Share of rejected records above which a run fails.
    max_error_rate: Rate = 0.05
    #: Separator of the tags field when it is one string.
    tags_separator: NonEmpty = ";"
    fields: Fields = Fields()
    #: Data-quality rules per normalized field (``transform/rules.py``).
    rules: dict[str, Rule] = {}
    anomaly: AnomalyConfig = AnomalyConfig()
    #: Days raw rows and rejects are kept (None: for ever); a raw row a normalized row
    #: points at is kept whatever its age (``runtime/retention.py``).
    retention_days: Days | None = None
    #: Days replaced versions of the source's rows are kept (None: for ever; 0: no version
    #: is kept, and reads as of a moment leave the source out); purged by maintenance.
    history_days: Annotated[float, msgspec.Meta(ge=0, le=36_500)] | None = None
    #: What a new, missing or retyped column does (``transform/drift.py``).
    schema_drift: Literal["evolve", "freeze", "discard_row", "discard_value"] = "evolve"
    #: ``detect``: after a complete, successful read, the source's keys it did not see are
    #: deleted (for the kinds read whole at each run; ``SourceKind.whole_read``).
    deletes: Literal["keep", "detect"] = "keep"
    #: The share of the source's rows one run may delete so; past it the run fails, deleting
    #: nothing (an export cut short must not empty the table).
    max_delete_fraction: Rate = 0.5

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
    #: Each row's own stream (a change kind's table), when the rows are of several.
    row_streams: list[str] | None = None
    #: Per row, what validation leaves alone: ``None`` the whole row (a delete: only its
    #: key matters), else the columns that were not sent (an unchanged TOASTed value).
    unchecked: list[tuple[str, ...] | None] | None = None
    #: Streams whose rows leave ``normalized_data`` before this batch's (a TRUNCATE).
    clear: list[str] = field(default_factory=list)
    #: (stream, snapshot id): after this batch, the stream's rows that the snapshot did not
    #: read leave ``normalized_data`` (the snapshot of a table is complete).
    sweep: list[tuple[str, int]] = field(default_factory=list)
    #: A backfill's batch: what its rows were read at (``SourceKind.seen_sql``'s ``$15``:
    #: a pg_cdc snapshot, a binlog position; "" where each row carries its own version). A
    #: row whose live version that read did not see is left alone. None: a live batch.
    read_point: str | None = None


@dataclass
class Prepared:
    """A batch ready for the database: COPY payload, rejects, counters, checkpoint state
    (made by ``load/batches.Preparer``, committed by ``load/write.py``)."""

    #: The stream whose checkpoint the batch moves.
    stream: str
    payload: bytes
    valid: int
    #: No two valid rows share a natural key (the upsert can skip its dedupe sort).
    distinct_keys: bool
    rejects: list[Reject]
    rows_read: int
    bytes_read: int
    state: dict[str, Any]
    pages: int = 0
    lines: int = 0
    #: What the batch was read from (a file, a page's URL, a feed), for the run's outcomes.
    part: str = ""
    #: Called once the batch is committed (a stream acknowledges its messages then).
    after_commit: Callable[[], Awaitable[Any]] | None = None
    #: Resolved when the batch has committed, or failed with its error: for a kind that
    #: must not read on before then (a change kind confirms its slot's position).
    committed: asyncio.Future[None] | None = None
    #: CRC-32s of the valid rows' keys (array of uint32): batches that share a key never
    #: commit at the same time.
    key_hashes: bytes = b""
    #: The source has ``unique`` fields: the commit checks their values.
    unique_checks: bool = False
    #: The shape to record (transform/drift.py) and the drift found, as run notes.
    shape: dict[str, str] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)
    #: ``shape`` is the stream's shape now (accepted): columns it lacks are forgotten.
    whole_shape: bool = False
    #: A change kind's TRUNCATEs and finished snapshots (see ``Batch``).
    clear: list[str] = field(default_factory=list)
    sweep: list[tuple[str, int]] = field(default_factory=list)
    #: A backfill's batch (see ``Batch``).
    read_point: str | None = None

    def counts(self, inserted: int, updated: int, deleted: int = 0) -> dict[str, int]:
        """The run's counters for this batch once committed."""
        return {"rows_read": self.rows_read, "rows_valid": self.valid,
                "rows_rejected": len(self.rejects), "rows_inserted": inserted,
                "rows_updated": updated,
                "rows_unchanged": max(0, self.valid - inserted - updated - deleted),
                "bytes_read": self.bytes_read, "pages_read": self.pages,
                "lines_read": self.lines, "rows_deleted": deleted}


class Checkpoints(dict[str, dict[str, Any]]):
    """{stream: state} to resume from (``load/checkpoint.py`` reads them), and ``this_run``:
    the streams the run itself committed."""

    this_run: set[str]


class Preparing(Protocol):
    """Batch → Prepared: validation and COPY encoding, run in a worker process (picklable).
    ``load/batches.Preparer`` is the one implementation."""

    src: SourceConfig

    def __call__(self, batch: Batch) -> Prepared: ...


class WorkerHandle(Protocol):
    """An object living in one worker process."""

    async def call(self, method: str, *args: Any) -> Any: ...


class WorkerPool(Protocol):
    """The process pool for CPU-bound work (``runtime/workers.Workers``)."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    def open(self, factory: Callable[..., Any],
             *args: Any) -> AbstractAsyncContextManager[WorkerHandle]: ...


@dataclass(frozen=True)
class Backfill:
    """A range of a source to read again (``runtime/backfill.py``): what ``start`` and
    ``end`` are (inclusive; None: open) is the kind's (``SourceKind.backfill_range``)."""

    id: int
    #: The table of a change kind (None: the kind's one range).
    stream: str | None
    start: str | None
    end: str | None


@dataclass
class Extraction:
    """What a kind's ``batches`` gets for one run of one source."""

    src: SourceConfig
    run_id: int
    #: Where each stream resumes ({stream: state}; ``.this_run``: streams this run committed).
    checkpoints: Checkpoints
    #: The config file's directory: relative paths are relative to it.
    base_dir: Path
    #: The process pool for CPU-bound parsing (created once by the runtime).
    workers: WorkerPool
    #: Batch → Prepared: validation and COPY encoding (``load/batches.py``).
    preparer: Preparing
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
    #: A backfill's run: read this range only (its checkpoints are the backfill's own,
    #: and the live position is not touched); its batches carry a ``read_point``.
    backfill: Backfill | None = None

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
    #: The kind reads a database's log: its raw rows are changes, with an ``op`` position
    #: (OP_INSERT, OP_UPDATE, OP_DELETE): a key's last change wins, a delete removes the
    #: row, and a mapped column an update did not send keeps its value.
    changes: ClassVar[bool] = False
    #: SQL of a raw row's (``r``) source version, kept in ``normalized_data.source_version``
    #: (see sql/migrations/0015_backfill.sql); NULL: the kind has none.
    version_sql: ClassVar[str] = "NULL::bigint"
    #: SQL saying whether a backfill's read saw the live version ``{v}`` (``{new}``: the
    #: backfilled row's own version; ``$15``: the batch's ``read_point``). None: the kind
    #: has no version, and a backfilled row overwrites what is there (last write wins).
    seen_sql: ClassVar[str | None] = None
    #: What ``--from``/``--to`` of a backfill are (None: the kind has no backfill).
    backfill_range: ClassVar[str | None] = None
    #: Why the kind's position cannot be moved back (None: it can): a rollback then keeps
    #: the position (``runtime/rollback.py``).
    no_rewind: ClassVar[str | None] = None

    # ``src: Any`` in these three: each kind takes its own config struct (a subclass of
    # SourceConfig); typed SourceConfig here, those narrower overrides would be unsound.
    def check_config(self, src: Any, where: str) -> None:
        """Raise ConfigError (``where`` names the source's key) for what types cannot say."""

    def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        """The source's batches from its checkpoints on, ready for the database."""
        raise NotImplementedError

    def whole_read(self, src: Any) -> str | None:
        """Why a run of ``src`` does not read the whole source (so ``deletes = "detect"``
        cannot say what is gone); None if it does (from the start: no checkpoint counts)."""
        return f"a {self.name} source is not read whole at each run"

    async def check(self, src: Any, base_dir: Path) -> str:
        """What ``etlsvc check`` says of the source; SourceError if it cannot be read."""
        raise NotImplementedError

    def check_backfill(self, src: Any, stream: str | None, start: str | None,
                       end: str | None) -> str | None:
        """The stream a backfill of ``src`` reads (None: the kind's one range), its range
        checked; BackfillError (code ``bad_range``) if it is not one."""
        if stream is not None:
            raise BackfillError(f"a {self.name} source's backfill takes no table",
                                "bad_range")
        return None

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
