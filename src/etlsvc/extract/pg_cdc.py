"""Kind ``pg_cdc``: every insert, update and delete of PostgreSQL tables, from a logical
replication slot, exactly once.

* **How the log is read.** Over asyncpg, with the SQL functions of logical decoding:
  ``pg_logical_slot_peek_binary_changes`` (``pgoutput``, protocol 1) reads the changes past
  the slot's confirmed position, and ``pg_replication_slot_advance`` confirms them once
  they are committed here. Chosen over the replication protocol because it needs no second
  driver (asyncpg has no replication protocol; psycopg2's is synchronous), holds the slot
  only while a read runs (a killed etlsvc never leaves it "active" for
  ``wal_sender_timeout``), and is faster than the floor: decoding 200,000 single-row
  transactions took 0.63 s by peek plus 0.04 s to advance, against 1.49 s for
  ``pg_recvlogical`` writing the same changes to a file (2.2x; PostgreSQL 18, this machine,
  ``bench/bench_pg_cdc.py`` measures it end to end). The messages are decoded by
  ``pgoutput.py``: the maintained decoders are tied to a synchronous driver.
* **Reads.** Each read decodes from the slot's restart point, which PostgreSQL moves only
  at a running-transactions record (every 15 s of activity, and at checkpoints): a backlog
  written faster than that is decoded again, in part, by every read of it. So a read is
  large (``changes_per_read``, default 1,000,000 messages; the server keeps its output in
  a temporary file, etlsvc streams it batch by batch): 1M backlogged single-row updates
  went from 20,000 to 32,700 changes/s end to end against 100,000 per read. A batch is
  built in a worker while the reader reads the next.
* **Snapshot, then stream.** The first run creates the slot (and the publication, for
  ``tables``), commits the slot's position as the checkpoint, then reads each table in a
  repeatable-read snapshot taken after the slot was made. A streamed transaction that the
  table's snapshot already saw (its xid is visible in it) is skipped for that table; every
  later one is applied: no gap, no overlap. A table added later (to ``tables``, or to the
  publication) is snapshotted the same way at the next run's start, or when the stream
  first shows a change of it; the stream waits for that snapshot only. A snapshot cut short
  (a crash) is taken again from the start; when it completes, the table's rows that it did
  not read leave ``normalized_data`` (they were deleted meanwhile).
* **Exactly once.** A batch holds whole source transactions, in commit order, and commits
  in one transaction with the end LSN of its last one as the checkpoint; the slot is
  advanced only after that commit. A transaction at or below the checkpoint (read again
  after a crash) is skipped. Transactions are never split: one larger than ``batch_size``
  is one batch of its own.
* **Changes.** Raw rows are changes (``op`` 1 insert or snapshot row, 2 update, 3 delete)
  with the transaction's end ``lsn``, their ``seq`` in it, and the ``snapshot`` that read
  them (0: streamed). A key's last change wins; a delete removes the row (the change feed
  shows it); an update whose key changed is a delete of the old key and an insert. An
  unchanged TOASTed value that an update does not send is taken from the old row (replica
  identity full), else from an earlier change of the batch, else ``normalized_data`` keeps
  its value. A TRUNCATE removes the source's rows of the table (changes of it before the
  TRUNCATE in the same batch are not loaded).
* **Schema changes** come as a new shape of the records and go through ``schema_drift``.
* **Slot hygiene.** The lag (bytes and seconds) and the WAL the slot retains are in
  ``/health`` and ``/metrics``; over ``max_retained_wal`` the source says so loudly (an
  error each read, ``failing`` in ``/health``, a metric to alert on) while it catches up.
  An idle slot is advanced past WAL that holds no change of its tables. A slot that is
  gone, or was moved past the checkpoint by someone else, stops the source with the
  recovery (``etlsvc cdc drop-slot SOURCE``, then a new snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import msgspec
import structlog

from etlsvc import metrics
from etlsvc.contract import (
    OP_DELETE,
    OP_INSERT,
    Backfill,
    BatchSize,
    Extraction,
    Fields,
    NonEmpty,
    Prepared,
    Preparing,
    SourceConfig,
    SourceKind,
)
from etlsvc.errors import ConfigError, SourceError, describe
from etlsvc.extract import changes, pgoutput
from etlsvc.extract.changes import (
    Building,
    awaited,
    prepare_records,
    update_rows,
    wait_to_reconnect,
)
from etlsvc.extract.records import text
from etlsvc.extract.sql_tables import check_credentials, connection_url
from etlsvc.logs import redact

log = structlog.get_logger()

#: The checkpoint stream of the slot's position (the tables' snapshots have their own).
WAL = "wal"
_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB)?\s*$")
_UNITS = {None: 1, "B": 1, "kB": 1 << 10, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30,
          "TB": 1 << 40}
#: Advance an idle slot once this much WAL (with none of its changes) is behind it.
IDLE_ADVANCE_BYTES = 1 << 20


class PgCdcSource(SourceConfig, tag="pg_cdc", kw_only=True):
    """Tables of a PostgreSQL database, from its write-ahead log."""

    url: str = ""
    url_env: NonEmpty | None = None
    password_env: NonEmpty | None = None
    #: Tables to capture (``name`` or ``schema.name``); etlsvc keeps a publication of them.
    tables: tuple[NonEmpty, ...] = ()
    #: Or an existing publication (its tables, as it says).
    publication: NonEmpty | None = None
    #: The replication slot's name (default ``etlsvc_<source>``).
    slot: NonEmpty | None = None
    fields: Fields
    batch_size: BatchSize = 5_000
    #: Changes one read of the slot decodes at most (whole transactions).
    changes_per_read: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 1_000_000
    #: Seconds between reads of an idle slot.
    poll_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5
    #: WAL the slot may hold back on the source (``512MB``, ``10GB``) before the source
    #: reports itself failing.
    max_retained_wal: str = "10GB"
    #: Seconds the source database may be unreachable mid-stream before the run fails.
    reconnect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0

    kind = "pg_cdc"

    @property
    def slot_name(self) -> str:
        return self.slot or "etlsvc_" + re.sub(r"[^a-z0-9_]", "_", self.name.lower())[:56]

    @property
    def publication_name(self) -> str:
        return self.publication or self.slot_name

    @property
    def max_retained_bytes(self) -> int:
        return size_bytes(self.max_retained_wal)


def size_bytes(value: str) -> int:
    """``512MB`` → bytes (PostgreSQL's units); ValueError if it is not a size."""
    found = _SIZE.match(value)
    if not found:
        raise ValueError(f"not a size: {value!r} (expected a number with B, kB, MB, GB or TB)")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def qualified(table: str) -> str:
    return table if "." in table else f"public.{table}"


@dataclass(frozen=True)
class Snapshot:
    """A table's snapshot as ``pg_current_snapshot()`` says it: which transactions it saw."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, value: str) -> Snapshot:
        xmin, xmax, xip = value.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def saw(self, xid32: int) -> bool:
        """Whether the (committed) transaction ``xid32`` was visible to the snapshot."""
        xid = widen(xid32, self.xmax)
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)


def widen(xid32: int, near: int) -> int:
    """The 64-bit transaction id whose low 32 bits are ``xid32`` (as pgoutput sends it),
    nearest the 64-bit ``near`` (the source's next xid when it was read)."""
    xid = (near & ~0xFFFFFFFF) | xid32
    if xid > near + (1 << 31):
        xid -= 1 << 32
    elif xid < near - (1 << 31):
        xid += 1 << 32
    return xid


@dataclass(slots=True)
class Txn:
    """A source transaction read from the slot: its changes' messages, undecoded (they are
    decoded in a worker; the reader only splits the stream into transactions)."""

    xid: int
    #: Microseconds since 2000-01-01 UTC, as the Begin message has it (a datetime per
    #: transaction was a tenth of the reader's time with single-row transactions).
    committed_us: int
    end_lsn: int = 0
    #: The 64-bit xid (``xid`` is its low 32 bits): the source version of its changes.
    xid64: int = 0
    changes: list[bytes] = field(default_factory=list)
    truncates: list[tuple[int, list[str]]] = field(default_factory=list)

    @property
    def committed_at(self) -> dt.datetime:
        return pgoutput.timestamp(self.committed_us)


def build_changes(preparer: Preparing, txns: list[Txn], relations: dict[int, Any],
                  snapshots: dict[str, Snapshot], key_column: str) -> Prepared:
    """In a worker: whole transactions → one batch of changes, prepared.

    A change of a table whose snapshot saw its transaction is skipped (the snapshot has
    it); an update's unchanged TOASTed values are filled from the old row or an earlier
    change of the batch; a TRUNCATE drops the batch's earlier changes of its tables."""
    cache = pgoutput.Relations(dict(relations))
    streams: list[str] = []
    positions: list[tuple[int, ...]] = []
    records: list[dict[str, Any]] = []
    unchecked: list[tuple[str, ...] | None] = []
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    clear: list[str] = []
    dropped: list[bool] = []
    for txn in txns:
        seq = 0
        truncates = dict(txn.truncates)
        for index, data in enumerate(txn.changes):
            for table in truncates.pop(index, ()):
                clear.append(table)
                dropped = [d or s == table for d, s in zip(dropped, streams, strict=True)]
            change = pgoutput.decode(data, cache)
            if not isinstance(change, pgoutput.Change):
                continue
            rel = change.relation
            table = rel.qualified
            snap = snapshots.get(table)
            if snap is not None and snap.saw(txn.xid):
                continue
            types = {c.name: c.type_oid for c in rel.columns}
            for op, values in _rows_of(change, key_column, types, latest, table):
                seq += 1
                missing = tuple(c for c, v in values.items() if v is pgoutput.UNCHANGED)
                record = {c: v for c, v in values.items() if v is not pgoutput.UNCHANGED}
                key = text(record.get(key_column))
                if op != OP_DELETE and key is not None:
                    latest[(table, key)] = record
                streams.append(table)
                positions.append((txn.end_lsn, seq, op, 0, txn.xid64))
                records.append(record)
                unchecked.append(None if op == OP_DELETE else missing)
                dropped.append(False)
        for table in truncates.get(len(txn.changes), ()):
            clear.append(table)
            dropped = [d or s == table for d, s in zip(dropped, streams, strict=True)]
    keep = [not d for d in dropped]
    return prepare_records(preparer, WAL, [s for s, k in zip(streams, keep) if k],
                           [p for p, k in zip(positions, keep) if k],
                           [r for r, k in zip(records, keep) if k],
                           [u for u, k in zip(unchecked, keep) if k],
                           state={"lsn": txns[-1].end_lsn, "xid": txns[-1].xid,
                                  "committed_at": txns[-1].committed_at.isoformat()},
                           clear=list(dict.fromkeys(clear)))


def _rows_of(change: pgoutput.Change, key_column: str, types: dict[str, int],
             latest: dict[tuple[str, str], dict[str, Any]],
             table: str) -> list[tuple[int, dict[str, Any]]]:
    """The raw rows of one change: (op, {column: JSON value or UNCHANGED})."""
    def values(row: dict[str, Any]) -> dict[str, Any]:
        return {c: v if v is None or v is pgoutput.UNCHANGED else
                pgoutput.json_value(types.get(c, 25), v) for c, v in row.items()}

    if change.op == "insert":
        assert change.new is not None
        return [(OP_INSERT, values(change.new))]
    old = values(change.old) if change.old is not None else None
    if change.op == "delete":
        return [(OP_DELETE, old or {})]
    assert change.new is not None
    new = values(change.new)
    if any(v is pgoutput.UNCHANGED for v in new.values()):
        before = latest.get((table, text(new.get(key_column)) or ""), {})
        for c, v in new.items():
            if v is pgoutput.UNCHANGED:
                if old is not None and old.get(c) is not pgoutput.UNCHANGED and c in old:
                    new[c] = old[c]             # the same row's value before the update
                elif c in before:
                    new[c] = before[c]
    return update_rows(old, new, key_column)


def _is_lost(exc: BaseException) -> bool:
    """The source's connection is gone (or the server is going away): worth a reconnect."""
    return isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                            asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
                            asyncpg.ConnectionFailureError, TimeoutError)) or (
        isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", "") in
        ("57P01", "57P02", "57P03", "08000", "08003", "08006"))


class _Reader:
    """One run's connection to the source and what it knows of it."""

    def __init__(self, src: PgCdcSource, ex: Extraction) -> None:
        self.src = src
        self.ex = ex
        self.url = connection_url(src)
        self.conn: asyncpg.Connection | None = None
        self.tables: dict[str, dict[str, Any]] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.lsn = 0
        #: Where the last read of the slot stopped looking (WAL up to it was decoded).
        self.idle_upto = 0
        self.last_txn: Txn | None = None

    async def connect(self) -> asyncpg.Connection:
        try:
            self.conn = await asyncpg.connect(
                self.url, timeout=30, server_settings={
                    "DateStyle": "ISO", "TimeZone": "UTC", "IntervalStyle": "postgres",
                    "extra_float_digits": "3", "application_name": "etlsvc-cdc"})
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise SourceError(self.src.name, f"cannot connect to {redact(self.url)}: "
                              f"{describe(exc)}") from exc
        return self.conn

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.close(), 5)
            self.conn = None

    def fail(self, message: str) -> SourceError:
        return SourceError(self.src.name, message)

    async def check_source(self) -> None:
        """wal_level, the publication and its tables, and each table's replica identity."""
        conn, src = self.conn, self.src
        assert conn is not None
        level = await conn.fetchval("SHOW wal_level")
        if level != "logical":
            raise self.fail(f"wal_level is {level!r} on the source; change data capture "
                            "needs 'logical' (ALTER SYSTEM SET wal_level = logical, then "
                            "restart PostgreSQL)")
        pub = src.publication_name
        exists = await conn.fetchval("SELECT true FROM pg_publication WHERE pubname = $1", pub)
        if src.publication and not exists:
            raise self.fail(f"publication {pub!r} does not exist on the source")
        if src.tables:
            wanted = ", ".join(_quote(qualified(t)) for t in src.tables)
            has = {f"{r['schema']}.{r['name']}" for r in await conn.fetch(_TABLES_SQL, pub)}
            try:
                if not exists:
                    await conn.execute(f"CREATE PUBLICATION {_quote(pub)} FOR TABLE {wanted}")
                elif has != {qualified(t) for t in src.tables}:
                    await conn.execute(f"ALTER PUBLICATION {_quote(pub)} SET TABLE {wanted}")
            except asyncpg.PostgresError as exc:
                raise self.fail(f"cannot keep publication {pub!r} of {wanted}: "
                                f"{describe(exc)}") from exc
        rows = await conn.fetch(_TABLES_SQL, pub)
        if not rows:
            raise self.fail(f"publication {pub!r} has no tables")
        key = src.fields.source_id
        for row in rows:
            name = f"{row['schema']}.{row['name']}"
            self.tables[name] = dict(row)
            if key not in row["columns"]:
                raise self.fail(f"table {name} has no column {key!r} (fields.source_id); "
                                f"its columns: {', '.join(row['columns'])}")
            identity = row["identity"]
            if identity == "f":
                continue
            if identity == "n" or not row["identity_columns"]:
                raise self.fail(
                    f"table {name} has no replica identity, so its updates and deletes "
                    "cannot name their row: give it a primary key, or ALTER TABLE "
                    f"{name} REPLICA IDENTITY FULL")
            if key not in row["identity_columns"]:
                raise self.fail(
                    f"table {name}: fields.source_id ({key!r}) is not in its replica "
                    f"identity ({', '.join(row['identity_columns'])}), so a delete would not "
                    f"say which row went: map source_id to it, or ALTER TABLE {name} "
                    "REPLICA IDENTITY FULL")

    async def slot_row(self) -> asyncpg.Record | None:
        assert self.conn is not None
        return await self.conn.fetchrow(_SLOT_SQL, self.src.slot_name)

    async def check_slot(self, state: dict[str, Any]) -> None:
        """The slot must be there, and not past the checkpoint."""
        row = await self.slot_row()
        self.lsn = int(state["lsn"])
        if row is None:
            raise self.fail(self.gone_message())
        if row["wal_status"] == "lost":
            raise self.fail(f"replication slot {self.src.slot_name!r} lost the WAL it needed "
                            "(max_slot_wal_keep_size): changes were removed before they were "
                            "read. " + RECOVERY.format(source=self.src.name))
        if row["confirmed"] is not None and row["confirmed"] > self.lsn:
            raise self.fail(
                f"replication slot {self.src.slot_name!r} is at {_lsn(row['confirmed'])}, past "
                f"this source's checkpoint {_lsn(self.lsn)}: something else consumed or "
                "advanced it, and the changes between are lost. "
                + RECOVERY.format(source=self.src.name))

    def gone_message(self) -> str:
        return (f"replication slot {self.src.slot_name!r} does not exist on the source "
                "(dropped, or not carried over by a failover): the changes since the "
                f"checkpoint {_lsn(self.lsn)} cannot be read. "
                + RECOVERY.format(source=self.src.name))

    async def create_slot(self) -> int:
        """A new slot (a leftover of a first run that never committed is made again)."""
        assert self.conn is not None
        name = self.src.slot_name
        if await self.slot_row() is not None:
            log.warning("dropping a replication slot left by a first run that never "
                        "committed", slot=name)
            await self.conn.execute("SELECT pg_drop_replication_slot($1)", name)
        try:
            return await self.conn.fetchval(
                "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')", name)
        except asyncpg.PostgresError as exc:
            raise self.fail(f"cannot create replication slot {name!r}: {describe(exc)}") \
                from exc

    async def advance(self, lsn: int) -> None:
        assert self.conn is not None
        try:
            await self.conn.execute(_ADVANCE_SQL, self.src.slot_name, lsn)
        except asyncpg.UndefinedObjectError as exc:
            raise self.fail(self.gone_message()) from exc

    async def lag(self, caught_up: bool, committed_at: dt.datetime | None,
                  row: asyncpg.Record | None = None) -> None:
        """The slot's lag and retained WAL (``row``: the slot as just read), to ``/health``
        and ``/metrics``; loud when over ``max_retained_wal``."""
        row = row or await self.slot_row()
        if row is None:
            raise self.fail(self.gone_message())
        seconds = 0.0 if caught_up or committed_at is None else max(
            0.0, (dt.datetime.now(dt.UTC) - committed_at).total_seconds())
        lag = row["lag"] or 0
        if caught_up:       # read up to idle_upto, with no change of ours: not behind there
            lag = max(0, min(lag, row["current"] - self.idle_upto))
        over = (row["retained"] or 0) > self.src.max_retained_bytes
        metrics.set_cdc_lag(self.src.name, self.src.slot_name, lag, seconds,
                            row["retained"] or 0, self.src.max_retained_bytes)
        if over:
            log.error("replication slot retains more WAL than max_retained_wal",
                      slot=self.src.slot_name, retained_bytes=row["retained"],
                      max_retained_wal=self.src.max_retained_wal)


RECOVERY = changes.RECOVERY.replace("{slot}", " and drops the slot; `etlsvc cdc drop-slot "
                                    "{source}` does the same")


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _quote(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


_TABLES_SQL = """
SELECT t.schemaname AS schema, t.tablename AS name, c.relreplident::text AS identity,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = '' ORDER BY a.attnum) AS columns,
       ARRAY(SELECT a.attname::text FROM pg_index i
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary) OR
                                           (c.relreplident = 'i' AND i.indisreplident))
            ) AS identity_columns
FROM pg_publication_tables t
JOIN pg_namespace n ON n.nspname = t.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
WHERE t.pubname = $1
ORDER BY 1, 2
"""
_SLOT_SQL = """
SELECT confirmed_flush_lsn AS confirmed, wal_status, pg_current_wal_lsn() AS current,
       (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag,
       (pg_current_wal_lsn() - restart_lsn)::bigint AS retained
FROM pg_replication_slots WHERE slot_name = $1
"""
_ADVANCE_SQL = """
SELECT pg_replication_slot_advance($1, $2::pg_lsn)
FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::pg_lsn
"""
_PEEK_SQL = """
SELECT data FROM pg_logical_slot_peek_binary_changes(
    $1, $2::pg_lsn, $3, 'proto_version', '1', 'publication_names', $4)
"""


class PgCdcKind(SourceKind):
    """PostgreSQL tables by logical decoding; see the module docstring."""

    name = "pg_cdc"
    config = PgCdcSource
    raw_table = "raw_pg_cdc_data"
    stream_column = "relation"
    position_columns = ("lsn", "seq", "op", "snapshot", "xid")
    position_keys = ("lsn", "seq", "op", "snapshot", "xid")
    record = "columns"
    continuous = True
    changes = True
    no_rewind = ("a replication slot cannot be moved back: the changes after the run are "
                 "gone from the server's log once confirmed")
    # A row's version is its last change's transaction; a backfill's read is a snapshot,
    # which saw that transaction or not (exact, unlike an LSN taken beside the snapshot).
    version_sql = "NULLIF(r.xid, 0)"
    seen_sql = "pg_visible_in_snapshot({v}::text::xid8, $15::text::pg_snapshot)"
    backfill_range = "values of a table's key column (fields.source_id), inclusive"

    def check_backfill(self, src: PgCdcSource, stream: str | None, start: str | None,
                       end: str | None) -> str | None:
        return changes.backfill_table(src, None if stream is None else qualified(stream),
                                      [qualified(t) for t in src.tables])

    def check_config(self, src: PgCdcSource, where: str) -> None:
        check_credentials(src, where)
        if src.url and not src.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{where}.url': expected postgresql://, got {redact(src.url)!r}")
        if bool(src.tables) == bool(src.publication):
            raise ConfigError(f"{where}.tables': set tables (etlsvc keeps a publication of "
                              "them) or publication (an existing one), one of them")
        for j, table in enumerate(src.tables):
            if not _TABLE.match(table):
                raise ConfigError(f"{where}.tables[{j}]': not a plain table name: {table!r}")
        if not _SLOT.match(src.slot_name):
            raise ConfigError(f"{where}.slot': a slot name is 1-63 lower-case letters, digits "
                              f"and underscores: {src.slot_name!r}")
        try:
            size_bytes(src.max_retained_wal)
        except ValueError as exc:
            raise ConfigError(f"{where}.max_retained_wal': {exc}") from None

    async def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        src: PgCdcSource = ex.src
        reader = _Reader(src, ex)
        await reader.connect()
        try:
            await reader.check_source()
            if ex.backfill is not None:
                async for prepared in self._backfill(ex, reader, ex.backfill):
                    yield prepared
                return
            wal = ex.checkpoints.get(WAL)
            if wal is None:
                lsn = await reader.create_slot()
                log.info("replication slot created", slot=src.slot_name, lsn=_lsn(lsn))
                reader.lsn = lsn
                first = awaited(await ex.workers.run(partial(
                    prepare_records, ex.preparer, WAL, [], [], [], [],
                    state={"lsn": lsn, "xid": 0, "slot": src.slot_name})))
                yield first
                await first.committed
            else:
                await reader.check_slot(wal)
            for table in reader.tables:
                state = ex.checkpoints.get(table) or {}
                if state.get("done"):
                    reader.snapshots[table] = Snapshot.parse(state["snapshot"])
                else:
                    async for prepared in self._snapshot(ex, reader, table):
                        yield prepared
            async for prepared in self._stream(ex, reader):
                yield prepared
        except asyncpg.UndefinedObjectError as exc:
            if "replication slot" in str(exc):
                raise reader.fail(reader.gone_message()) from exc
            raise reader.fail(f"source query failed: {describe(exc)}") from exc
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            raise reader.fail(f"source query failed: {describe(exc)}") from exc
        finally:
            await reader.close()

    async def _snapshot(self, ex: Extraction, reader: _Reader,
                        table: str) -> AsyncIterator[Prepared]:
        """The table's rows in a snapshot taken now, then its sweep; waits until committed."""
        src = reader.src
        # A connection of its own: the stream's may be inside a read of the slot.
        conn = await _Reader(src, ex).connect()
        try:
            async for prepared in self._read_table(ex, reader, table, conn):
                yield prepared
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    async def _read_table(self, ex: Extraction, reader: _Reader, table: str,
                          conn: asyncpg.Connection) -> AsyncIterator[Prepared]:
        src = reader.src
        snapshot_id = time.time_ns() // 1000
        info = reader.tables[table]
        columns = info["columns"]
        types = await _column_types(conn, table)
        select = ("SELECT " + ", ".join(f"{_quote(c)}::text" for c in columns) +
                  f" FROM {_quote(table)}")
        log.info("snapshot of a table", table=table, snapshot=snapshot_id)
        rows_done = 0
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snap = await conn.fetchval("SELECT pg_current_snapshot()::text")
            state = {"snapshot": snap, "id": snapshot_id, "done": False}
            cursor = await (await conn.prepare(select)).cursor()
            while rows := await cursor.fetch(src.batch_size):
                records = [{c: pgoutput.json_value(types.get(c, 25), v)
                            for c, v in zip(columns, row)} for row in rows]
                positions = [(0, rows_done + i + 1, OP_INSERT, snapshot_id, 0)
                             for i in range(len(rows))]
                rows_done += len(rows)
                yield await ex.workers.run(partial(
                    prepare_records, ex.preparer, table, [table] * len(rows), positions,
                    records, [()] * len(rows), state={**state, "rows": rows_done}))
        done = awaited(await ex.workers.run(partial(
            prepare_records, ex.preparer, table, [], [], [], [],
            state={**state, "done": True, "rows": rows_done}, sweep=[(table, snapshot_id)])))
        yield done
        await done.committed
        reader.snapshots[table] = Snapshot.parse(snap)
        log.info("snapshot of a table done", table=table, rows=rows_done)

    async def _backfill(self, ex: Extraction, reader: _Reader,
                        bf: Backfill) -> AsyncIterator[Prepared]:
        """A key range of a table in a repeatable-read snapshot, in key order, from the
        key after the checkpoint's; the slot is not touched. Each batch's read point is the
        snapshot: a row whose live change it did not see is left alone."""
        src, conn = reader.src, reader.conn
        assert conn is not None and bf.stream is not None
        table = bf.stream
        if table not in reader.tables:
            raise reader.fail(f"table {table} is not in publication {src.publication_name!r}")
        columns = reader.tables[table]["columns"]
        key = src.fields.source_id
        assert key is not None
        types = await _column_types(conn, table)
        key_type = await conn.fetchval("SELECT format_type($1::oid, NULL)", types[key])
        state = ex.checkpoints.get(table) or {}
        bounds = [(op, value) for op, value in ((">=", bf.start), ("<=", bf.end),
                                                (">", state.get("after"))) if value is not None]
        where = " AND ".join(f"{_quote(key)} {op} ${i}::text::{key_type}"
                             for i, (op, _) in enumerate(bounds, 1))
        select = ("SELECT " + ", ".join(f"{_quote(c)}::text" for c in columns) +
                  f" FROM {_quote(table)}{' WHERE ' + where if where else ''} "
                  f"ORDER BY {_quote(key)}")
        at = columns.index(key)
        done = int(state.get("rows", 0))
        log.info("backfill of a table", table=table, start=bf.start, end=bf.end,
                 after=state.get("after"))
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snap = await conn.fetchval("SELECT pg_current_snapshot()::text")
            cursor = await (await conn.prepare(select)).cursor(*(v for _, v in bounds))
            while rows := await cursor.fetch(src.batch_size):
                records = [{c: pgoutput.json_value(types.get(c, 25), v)
                            for c, v in zip(columns, row)} for row in rows]
                positions = [(0, done + i + 1, OP_INSERT, -bf.id, 0) for i in range(len(rows))]
                done += len(rows)
                yield await ex.workers.run(partial(
                    prepare_records, ex.preparer, table, [table] * len(rows), positions,
                    records, [()] * len(rows), read_point=snap,
                    state=changes.backfill_state(bf, done, rows[-1][at])))

    async def _stream(self, ex: Extraction, reader: _Reader) -> AsyncIterator[Prepared]:
        """Whole transactions from the slot, batch by batch, for ever (``serve``) or until
        caught up (``run``); the slot advanced after each read's last batch committed."""
        src = reader.src
        relations: dict[int, pgoutput.Relation] = {}
        key = src.fields.source_id
        assert key is not None
        deadline: float | None = None
        building: Building[Txn] = Building()

        async def built() -> Prepared:
            prepared, txn = await building.next()
            reader.lsn, reader.last_txn = txn.end_lsn, txn     # yielded: past it on a re-read
            return prepared

        try:
            while ex.stopping is None or not ex.stopping.is_set():
                try:
                    got, last = 0, None
                    async for txns, messages, known in self._read(reader, relations):
                        got += messages
                        if not txns:
                            continue
                        unknown = {_table_of(m, relations) for t in txns for m in t.changes}
                        if new := sorted(unknown - set(reader.snapshots) - {None}):
                            while building:         # the batches before it, in order
                                yield (last := await built())
                            for table in new:
                                # A table new to the publication: its snapshot first.
                                reader.tables.setdefault(table, await self._table_info(
                                    reader, table))
                                async for prepared in self._snapshot(ex, reader, table):
                                    yield prepared
                        building.add(ex.workers.run(build_changes, ex.preparer, txns, known,
                                                    dict(reader.snapshots), key), txns[-1])
                        if len(building) > 1:
                            yield (last := await built())
                    while building:
                        yield (last := await built())
                    deadline = None
                    if last is not None:
                        await last.committed
                        await reader.advance(reader.lsn)
                        assert reader.last_txn is not None
                        await reader.lag(False, reader.last_txn.committed_at)
                        continue
                    if got:         # only transactions committed here already (after a crash)
                        await reader.advance(reader.lsn)
                        continue
                    # Nothing to read: caught up.
                    slot = await reader.slot_row()
                    if slot is None:
                        raise reader.fail(reader.gone_message())
                    if (slot["lag"] or 0) >= IDLE_ADVANCE_BYTES:
                        # WAL without a change of ours: move the slot past it (checkpoint first).
                        idle = awaited(await ex.workers.run(partial(
                            prepare_records, ex.preparer, WAL, [], [], [], [],
                            state={"lsn": reader.idle_upto, "xid": 0})))
                        yield idle
                        await idle.committed
                        reader.lsn = reader.idle_upto
                        await reader.advance(reader.lsn)
                        slot = None                     # moved: read it again
                    await reader.lag(True, None, slot)
                    if ex.stopping is None:
                        return                          # `etlsvc run`: caught up
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ex.stopping.wait(), src.poll_interval_s)
                except SourceError:
                    raise
                except Exception as exc:
                    building.drop()
                    if not _is_lost(exc):
                        raise
                    await reader.close()
                    deadline = await wait_to_reconnect(deadline, src.reconnect_timeout_s, exc,
                                                       reader.fail)
                    with contextlib.suppress(SourceError):
                        await reader.connect()
        finally:
            building.drop()

    @staticmethod
    async def _table_info(reader: _Reader, table: str) -> dict[str, Any]:
        assert reader.conn is not None
        rows = await reader.conn.fetch(_TABLES_SQL, reader.src.publication_name)
        for row in rows:
            if f"{row['schema']}.{row['name']}" == table:
                return dict(row)
        raise reader.fail(f"table {table} is not in publication "
                          f"{reader.src.publication_name!r}")

    async def _read(self, reader: _Reader, relations: dict[int, pgoutput.Relation]
                    ) -> AsyncIterator[tuple[list[Txn], int, dict[int, pgoutput.Relation]]]:
        """One read of the slot, about ``batch_size`` changes at a time: whole transactions
        past the checkpoint, the messages read, and the relations as they were before
        them (a relation message among them redefines one from there on)."""
        src, conn = reader.src, reader.conn
        if conn is None:
            raise ConnectionError("not connected to the source")
        upto, next_xid = await conn.fetchrow(
            "SELECT pg_current_wal_lsn(), pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        reader.idle_upto = upto
        cache = pgoutput.Relations(relations)
        txns: list[Txn] = []
        txn: Txn | None = None
        size = messages = 0
        known = dict(relations)
        async with conn.transaction():
            cursor = conn.cursor(_PEEK_SQL, src.slot_name, upto, src.changes_per_read,
                                 src.publication_name, prefetch=2000)
            async for (data,) in cursor:
                messages += 1
                tag = data[:1]
                if tag in (b"I", b"U", b"D"):
                    assert txn is not None
                    txn.changes.append(data)
                    size += 1
                elif tag == b"B":
                    txn = Txn(*pgoutput.begin_fields(data))
                    txn.xid64 = widen(txn.xid, next_xid)
                elif tag == b"C":
                    assert txn is not None
                    txn.end_lsn = pgoutput.commit_end_lsn(data)
                    if txn.end_lsn > reader.lsn:        # else: committed here already
                        txns.append(txn)
                    txn = None
                    if size >= src.batch_size:
                        yield txns, messages, known
                        txns, size, messages, known = [], 0, 0, dict(relations)
                elif tag == b"R":
                    pgoutput.decode(data, cache)
                    assert txn is not None
                    txn.changes.append(data)        # the worker needs it in order too
                elif tag == b"T":
                    assert txn is not None
                    trunc = pgoutput.decode(data, cache)
                    txn.truncates.append((len(txn.changes),
                                          [r.qualified for r in trunc.relations]))
        if txns or messages:
            yield txns, messages, known

    async def check(self, src: PgCdcSource, base_dir: Path) -> str:
        reader = _Reader(src, None)  # type: ignore[arg-type]
        await reader.connect()
        try:
            await reader.check_source()
            slot = await reader.slot_row()
        finally:
            await reader.close()
        where = (f"slot {src.slot_name} {slot['lag']} bytes behind" if slot else
                 f"slot {src.slot_name} not made yet")
        return (f"postgresql publication {src.publication_name}: "
                f"{', '.join(reader.tables)}; {where}")


async def _column_types(conn: asyncpg.Connection, table: str) -> dict[str, int]:
    """A table's columns and their type oids."""
    return dict(await conn.fetch(
        "SELECT a.attname::text, a.atttypid::int FROM pg_attribute a "
        "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped",
        _quote(table)))


def _table_of(data: bytes, relations: dict[int, pgoutput.Relation]) -> str | None:
    """The table a change message is of (None for a relation message)."""
    if data[:1] == b"R":
        return None
    rel = relations.get(int.from_bytes(data[1:5], "big"))
    return rel.qualified if rel else None


async def drop_slot(src: PgCdcSource) -> bool:
    """Drop the source's replication slot; whether there was one (``etlsvc cdc drop-slot``)."""
    reader = _Reader(src, None)  # type: ignore[arg-type]
    conn = await reader.connect()
    try:
        return bool(await conn.fetchval(
            "SELECT pg_drop_replication_slot(slot_name) IS NULL FROM pg_replication_slots "
            "WHERE slot_name = $1", src.slot_name))
    finally:
        await reader.close()


KIND = PgCdcKind()
