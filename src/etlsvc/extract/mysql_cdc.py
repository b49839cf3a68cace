"""Kind ``mysql_cdc``: every insert, update and delete of MySQL/MariaDB tables, from the
row-based binary log, exactly once.

* **How the log is read.** ``mysql-replication`` (python-mysql-replication) registers as a
  replica and decodes the binlog's row events, table maps with their column names
  (``binlog_row_metadata = FULL``), GTID, XID and query events, MariaDB's included.
  Chosen on merit: it is maintained and knows MariaDB's events and GTIDs (the binlog
  module of asyncmy, our driver for reads, does not). It is synchronous, so one pass over
  the binlog runs in a thread: it reads from the checkpoint to the log's end
  (non-blocking), groups the events into whole transactions and hands them on a batch at a
  time through a queue of two (backpressure: the thread waits while batches commit).
  ``etlsvc run`` makes one pass; ``etlsvc serve`` makes one every ``poll_interval_s``.
* **Snapshot, then stream.** A table whose snapshot is not done is read in a transaction
  ``WITH CONSISTENT SNAPSHOT``; MariaDB says which binlog position that snapshot saw
  (``binlog_snapshot_file``/``_position``), MySQL gets it under a moment's ``FLUSH TABLES
  WITH READ LOCK`` (needs RELOAD). The first run commits that position as the stream's
  checkpoint; a streamed transaction of a table that ends at or before the table's snapshot
  position is skipped for it, every later one applied: no gap, no overlap. A table added to
  ``tables`` later is snapshotted at the next start while the stream's checkpoint stays.
* **Exactly once.** The checkpoint is the binlog file and the position after the last
  transaction of a batch, committed with the batch; a restart reads from there.
  Transactions are never split; one larger than ``batch_size`` is one batch.
* **Values.** The snapshot (text protocol) and the binlog (row images) make the same
  record of a row: timestamps are read in UTC, SET values are their members sorted and
  comma-joined, FLOAT columns keep the 6 significant digits the server prints, JSON columns
  are JSON (MySQL's binary JSON and MariaDB's text alike), binary strings base64.
* **Schema changes** come as table maps with other columns, so as a new shape of the
  records: ``schema_drift`` decides. ``TRUNCATE TABLE`` removes the source's rows of the
  table.
* **A binlog position that is gone** (purged by ``binlog_expire_logs_seconds``, or another
  server after a failover) stops the source with the recovery: ``etlsvc cdc reset``, then a
  new snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import queue
import re
import threading
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NamedTuple
from urllib.parse import unquote, urlsplit

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
from etlsvc.extract import changes
from etlsvc.extract.changes import (
    Building,
    awaited,
    prepare_records,
    update_rows,
    wait_to_reconnect,
)
from etlsvc.extract.sql_tables import Paced, check_credentials, connection_url
from etlsvc.logs import redact

log = structlog.get_logger()

#: The checkpoint stream of the binlog position (the tables' snapshots have their own).
BINLOG = "binlog"
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
_TRUNCATE = re.compile(r"^\s*TRUNCATE\s+(?:TABLE\s+)?([`\w$.]+)", re.I)
_FIELD_FLOAT = 4          # pymysql.constants.FIELD_TYPE.FLOAT
#: Position moved this far without a change of ours: checkpoint it anyway.
IDLE_ADVANCE_BYTES = 1 << 20


class MysqlCdcSource(SourceConfig, tag="mysql_cdc", kw_only=True):
    """Tables of a MySQL or MariaDB server, from its binary log."""

    #: ``mysql://user@host:3306/db`` without a password (see ``password_env``).
    url: str = ""
    url_env: NonEmpty | None = None
    password_env: NonEmpty | None = None
    #: Tables to capture: ``name`` (in the URL's database) or ``database.name``.
    tables: tuple[NonEmpty, ...] = ()
    #: The replica id etlsvc registers with (unique among the server's replicas; default
    #: derived from the source's name).
    server_id: Annotated[int, msgspec.Meta(ge=1, le=4_294_967_295)] | None = None
    fields: Fields
    batch_size: BatchSize = 5_000
    #: Seconds between passes over the binlog once caught up (``etlsvc serve``).
    poll_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.5
    #: Seconds the server may be unreachable mid-stream before the run fails.
    reconnect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0

    kind = "mysql_cdc"

    @property
    def replica_id(self) -> int:
        return self.server_id or 1_000_000_000 + zlib.crc32(self.name.encode()) % 1_000_000_000


class Position(NamedTuple):
    """A place in the binlog: the file's name and a byte offset in it."""

    file: str
    pos: int

    @property
    def key(self) -> tuple[int, int]:
        """Comparable across files: (the file's number, the offset)."""
        return _file_number(self.file), self.pos


def _file_number(name: str) -> int:
    suffix = name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


@dataclass(slots=True)
class Txn:
    """A source transaction from the binlog: its row changes, in order."""

    end: Position
    timestamp: int
    #: (table, op, before, after): op "insert" (after), "update" (both), "delete" (before).
    rows: list[tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]] = \
        field(default_factory=list)
    truncate: str | None = None


# -- the thread that reads the binlog -------------------------------------------------------

class _End:
    """The pass reached the end of the binlog."""


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _row_values(row: dict[str, Any], floats: set[str]) -> dict[str, Any]:
    return {c: _value(v, c in floats) for c, v in row.items()}


def _value(v: Any, is_float: bool = False) -> Any:
    """A binlog value as the snapshot's text protocol gives it (see the docstring)."""
    if isinstance(v, set):
        return ",".join(sorted(v))
    if is_float and isinstance(v, float):
        return float(f"{v:.6g}")
    return v


def read_binlog(settings: dict[str, Any], server_id: int, start: Position,
                tables: frozenset[str], batch_size: int, out: queue.Queue[Any],
                stop: threading.Event) -> None:
    """In a thread: one pass from ``start`` to the binlog's end; lists of whole
    transactions (about ``batch_size`` rows each) into ``out``, then an ``_End``."""
    from pymysqlreplication import BinLogStreamReader
    from pymysqlreplication.event import (
        GtidEvent,
        MariadbGtidEvent,
        QueryEvent,
        RotateEvent,
        XidEvent,
    )
    from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    stream = BinLogStreamReader(
        connection_settings=settings, server_id=server_id, log_file=start.file,
        # MySQL's dump by file and position, which MariaDB serves too: the library's MariaDB
        # mode positions by GTID only (it would read from the first binlog on).
        log_pos=start.pos, resume_stream=True, blocking=False, is_mariadb=False,
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, QueryEvent, XidEvent,
                     RotateEvent, GtidEvent, MariadbGtidEvent])
    try:
        file, batch, size = start.file, [], 0
        txn: Txn | None = None
        for event in stream:
            if stop.is_set():
                return
            if isinstance(event, RotateEvent):
                file = event.next_binlog
                continue
            end = Position(file, event.packet.log_pos)
            if isinstance(event, (GtidEvent, MariadbGtidEvent)):
                txn = Txn(end, event.timestamp)
            elif isinstance(event, (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)):
                table = f"{event.schema}.{event.table}"
                if table not in tables:
                    continue
                if txn is None:
                    txn = Txn(end, event.timestamp)
                floats = {c.name for c in event.columns if c.type == _FIELD_FLOAT}
                for row in event.rows:
                    if isinstance(event, WriteRowsEvent):
                        txn.rows.append((table, "insert", None,
                                         _row_values(row["values"], floats)))
                    elif isinstance(event, UpdateRowsEvent):
                        txn.rows.append((table, "update",
                                         _row_values(row["before_values"], floats),
                                         _row_values(row["after_values"], floats)))
                    else:
                        txn.rows.append((table, "delete", _row_values(row["values"], floats),
                                         None))
            elif isinstance(event, QueryEvent) and event.query.strip().upper() == "BEGIN":
                txn = Txn(end, event.timestamp)
            else:           # XID, COMMIT or a statement of its own (DDL): the end of one
                done = txn or Txn(end, event.timestamp)
                done.end = end
                if isinstance(event, QueryEvent) and (found := _TRUNCATE.match(event.query)):
                    name = found.group(1).replace("`", "")
                    schema = event.schema.decode() if isinstance(event.schema, bytes) \
                        else event.schema
                    table = name if "." in name else f"{schema}.{name}"
                    if table in tables:
                        done.truncate = table
                txn = None
                batch.append(done)
                size += len(done.rows)
                if size >= batch_size:
                    put(batch)
                    batch, size = [], 0
        if batch:
            put(batch)
        put(_End())
    except BaseException as exc:        # handed to the event loop, raised there
        put(_Failed(exc))
    finally:
        stream.close()


# -- a worker: transactions → a prepared batch ---------------------------------------------

def build_changes(preparer: Preparing, txns: list[Txn], snapshots: dict[str, tuple[int, int]],
                  key_column: str) -> Prepared:
    """In a worker: whole transactions → one batch of changes, prepared. A change of a
    table whose snapshot saw its transaction is skipped; an update whose key changed is a
    delete and an insert; a TRUNCATE drops the batch's earlier changes of its table."""
    streams: list[str] = []
    positions: list[tuple[int, ...]] = []
    records: list[dict[str, Any]] = []
    unchecked: list[tuple[str, ...] | None] = []
    clear: list[str] = []
    for txn in txns:
        number, pos = txn.end.key
        if txn.truncate and not (txn.end.key <= snapshots.get(txn.truncate, (-1, -1))):
            clear.append(txn.truncate)
            keep = [s != txn.truncate for s in streams]
            streams, positions, records, unchecked = (
                [x for x, k in zip(column, keep) if k]
                for column in (streams, positions, records, unchecked))
        seq = 0
        for table, op, before, after in txn.rows:
            if txn.end.key <= snapshots.get(table, (-1, -1)):
                continue                    # the table's snapshot has it
            if op == "insert":
                assert after is not None
                rows = [(OP_INSERT, after)]
            elif op == "update":
                assert after is not None
                rows = update_rows(before, after, key_column)
            else:
                assert before is not None
                rows = [(OP_DELETE, {key_column: before.get(key_column)})]
            for row_op, values in rows:
                seq += 1
                streams.append(table)
                positions.append((number, pos, seq, row_op, 0))
                records.append(values)
                unchecked.append(None if row_op == OP_DELETE else ())
    last = txns[-1]
    return prepare_records(preparer, BINLOG, streams, positions, records, unchecked,
                           state={"file": last.end.file, "pos": last.end.pos,
                                  "at": dt.datetime.fromtimestamp(last.timestamp,
                                                                  dt.UTC).isoformat()},
                           clear=list(dict.fromkeys(clear)))


def snapshot_records(preparer: Preparing, table: str, columns: list[str], kinds: list[str],
                     rows: list[tuple[Any, ...]], first: int, snapshot_id: int,
                     state: dict[str, Any], read_point: str | None = None) -> Prepared:
    """In a worker: rows a snapshot (or a backfill: ``read_point``) read → a prepared
    batch (values made as the binlog's)."""
    records = [{c: _snapshot_value(v, k) for c, k, v in zip(columns, kinds, row)}
               for row in rows]
    positions = [(0, 0, first + i, OP_INSERT, snapshot_id) for i in range(len(rows))]
    return prepare_records(preparer, table, [table] * len(rows), positions, records,
                           [()] * len(rows), state=state, read_point=read_point)


def _snapshot_value(v: Any, data_type: str) -> Any:
    if v is None:
        return None
    if data_type == "set" and isinstance(v, str):
        return ",".join(sorted(m for m in v.split(",") if m))
    if data_type == "json" and isinstance(v, (str, bytes)):
        return msgspec.json.decode(v)      # MySQL's JSON type (MariaDB's is text)
    return v


# -- the source ------------------------------------------------------------------------------

class _Server:
    """One run's view of the source server: its settings, tables and connections."""

    def __init__(self, src: MysqlCdcSource) -> None:
        self.src = src
        self.url = connection_url(src)          # type: ignore[arg-type]
        parts = urlsplit(self.url)
        self.database = parts.path.lstrip("/")
        self.settings = {"host": parts.hostname or "127.0.0.1", "port": parts.port or 3306,
                         "user": unquote(parts.username or ""),
                         "password": unquote(parts.password or "")}
        self.mariadb = False
        #: table → its columns' data types (information_schema), for the snapshot
        self.tables: dict[str, dict[str, str]] = {}
        #: After the last batch handed on: where it ends, and its last commit's time.
        self.position = Position("", 0)
        self.last_at = 0

    def fail(self, message: str) -> SourceError:
        return SourceError(self.src.name, message)

    def qualified(self, table: str) -> str:
        return table if "." in table else f"{self.database}.{table}"

    async def connect(self) -> Any:
        import asyncmy  # the driver of MySQL sources (extract/sql_tables.py)

        s = self.settings
        try:
            return await asyncmy.connect(host=s["host"], port=s["port"], user=s["user"],
                                         password=s["password"], connect_timeout=30,
                                         autocommit=True)
        except Exception as exc:
            raise self.fail(f"cannot connect to {redact(self.url)}: {describe(exc)}") from exc

    async def check(self) -> None:
        """The server's binlog settings, and each table with source_id in its key."""
        conn = await self.connect()
        try:
            async with conn.cursor() as cur:
                await cur.execute("SELECT @@version, @@log_bin, @@binlog_format, "
                                  "@@binlog_row_image")
                version, log_bin, fmt, image = await cur.fetchone()
                self.mariadb = "mariadb" in str(version).lower()
                if not int(log_bin):
                    raise self.fail("the server's binary log is off: set log_bin (log-bin in "
                                    "its config, with server_id) and restart it")
                if str(fmt).upper() != "ROW":
                    raise self.fail(f"binlog_format is {fmt}: row changes need ROW (SET GLOBAL "
                                    "binlog_format = ROW, and in the server's config)")
                if str(image).upper() != "FULL":
                    raise self.fail(f"binlog_row_image is {image}: updates and deletes must "
                                    "carry whole rows (SET GLOBAL binlog_row_image = FULL, "
                                    "and in the server's config)")
                try:
                    await cur.execute("SELECT @@binlog_row_metadata")
                    (metadata,) = await cur.fetchone()
                except Exception as exc:
                    raise self.fail("the server has no binlog_row_metadata (MySQL 8.0.1+ or "
                                    "MariaDB 10.5+ needed): the binlog would not name "
                                    f"columns ({describe(exc)})") from exc
                if str(metadata).upper() != "FULL":
                    raise self.fail(f"binlog_row_metadata is {metadata}: the binlog must name "
                                    "the columns (SET GLOBAL binlog_row_metadata = FULL, and "
                                    "in the server's config)")
                key = self.src.fields.source_id
                for table in self.src.tables:
                    name = self.qualified(table)
                    schema, _, bare = name.partition(".")
                    await cur.execute(
                        "SELECT column_name, data_type, column_key FROM "
                        "information_schema.columns WHERE table_schema = %s AND "
                        "table_name = %s ORDER BY ordinal_position", (schema, bare))
                    cols = await cur.fetchall()
                    if not cols:
                        raise self.fail(f"table {name} does not exist (or this user may not "
                                        "see it: GRANT SELECT)")
                    self.tables[name] = {c[0]: str(c[1]).lower() for c in cols}
                    primary = [c[0] for c in cols if c[2] == "PRI"]
                    if not primary:
                        raise self.fail(f"table {name} has no primary key, so its updates and "
                                        "deletes cannot name their row: give it one")
                    if key not in primary:
                        raise self.fail(f"table {name}: fields.source_id ({key!r}) is not in "
                                        f"its primary key ({', '.join(primary)})")
        finally:
            conn.close()

    async def binlogs(self) -> dict[str, int]:
        """The server's binlog files and their sizes."""
        conn = await self.connect()
        try:
            async with conn.cursor() as cur:
                await cur.execute("SHOW BINARY LOGS")
                return {row[0]: int(row[1]) for row in await cur.fetchall()}
        except Exception as exc:
            raise self.fail(f"SHOW BINARY LOGS failed: {describe(exc)} (the user needs "
                            "REPLICATION CLIENT, or BINLOG MONITOR on MariaDB)") from exc
        finally:
            conn.close()

    async def check_position(self, at: Position) -> None:
        files = await self.binlogs()
        if at.file not in files or at.pos > files[at.file]:
            raise self.fail(
                f"binlog position {at.file}:{at.pos} (this source's checkpoint) is not on "
                "the server any more (purged by binlog_expire_logs_seconds, or another "
                "server after a failover): the changes since cannot be read. "
                + RECOVERY.format(source=self.src.name))

    async def lag(self, position: Position) -> None:
        """The binlog bytes past ``position`` and the age of the last change read, to
        ``/health`` and ``/metrics``."""
        files = await self.binlogs()
        at = _file_number(position.file)
        behind = sum(max(0, size - position.pos) if _file_number(name) == at else size
                     for name, size in files.items() if _file_number(name) >= at)
        seconds = 0.0 if behind == 0 or not self.last_at else max(
            0.0, time.time() - self.last_at)
        metrics.set_cdc_lag(self.src.name, BINLOG, behind, seconds, 0, 0)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[tuple[Any, Position]]:
        """A connection in a consistent-snapshot transaction, and the binlog position the
        snapshot saw."""
        conn = await self.connect()
        try:
            async with conn.cursor() as cur:
                await cur.execute("SET SESSION time_zone = '+00:00'")
                await cur.execute("SET SESSION net_write_timeout = 3600")
                await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                if self.mariadb:
                    await cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                    await cur.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
                    status = {k.lower(): v for k, v in await cur.fetchall()}
                    at = Position(status["binlog_snapshot_file"],
                                  int(status["binlog_snapshot_position"]))
                else:
                    await cur.execute("FLUSH TABLES WITH READ LOCK")
                    try:
                        await cur.execute("SHOW MASTER STATUS")
                        row = await cur.fetchone()
                        await cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, "
                                          "READ ONLY")
                    finally:
                        await cur.execute("UNLOCK TABLES")
                    at = Position(row[0], int(row[1]))
            yield conn, at
        finally:
            conn.close()


RECOVERY = changes.RECOVERY.replace("{slot}", "")


class MysqlCdcKind(SourceKind):
    """MySQL/MariaDB tables from the binlog; see the module docstring."""

    name = "mysql_cdc"
    config = MysqlCdcSource
    raw_table = "raw_mysql_cdc_data"
    stream_column = "relation"
    position_columns = ("binlog_file", "binlog_pos", "seq", "op", "snapshot")
    position_keys = ("binlog_file", "binlog_pos", "seq", "op", "snapshot")
    record = "columns"
    continuous = True
    changes = True
    # A streamed row's version is the binlog position after its transaction; a backfill
    # reads in a consistent snapshot whose binlog position says exactly what it saw.
    version_sql = "CASE WHEN r.snapshot = 0 THEN r.binlog_file << 32 | r.binlog_pos END"
    seen_sql = "{v} <= $15::text::bigint"
    backfill_range = "values of a table's key column (fields.source_id), inclusive"

    def check_backfill(self, src: MysqlCdcSource, stream: str | None, start: str | None,
                       end: str | None) -> str | None:
        server = _Server(src)
        return changes.backfill_table(src, None if stream is None else server.qualified(stream),
                                      [server.qualified(t) for t in src.tables])

    def check_config(self, src: MysqlCdcSource, where: str) -> None:
        check_credentials(src, where)
        if src.url:
            parts = urlsplit(src.url)
            if parts.scheme not in ("mysql", "mariadb"):
                raise ConfigError(f"{where}.url': expected mysql://, got {redact(src.url)!r}")
            if not parts.path.strip("/") and any("." not in t for t in src.tables):
                raise ConfigError(f"{where}.url': name the database in the URL "
                                  "(mysql://user@host/db), or each table as database.table")
        if not src.tables:
            raise ConfigError(f"{where}.tables': name the tables to capture")
        for j, table in enumerate(src.tables):
            if not _TABLE.match(table):
                raise ConfigError(f"{where}.tables[{j}]': not a plain table name: {table!r}")

    async def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        src: MysqlCdcSource = ex.src
        server = _Server(src)
        await server.check()
        if ex.backfill is not None:
            async for prepared in self._backfill(ex, server, ex.backfill):
                yield prepared
            return
        tables = [server.qualified(t) for t in src.tables]
        state = ex.checkpoints.get(BINLOG)
        if state is not None:
            await server.check_position(Position(state["file"], int(state["pos"])))
        pending = [t for t in tables if not (ex.checkpoints.get(t) or {}).get("done")]
        snapshots = {t: Position(s["file"], int(s["pos"])).key for t in tables
                     if (s := ex.checkpoints.get(t) or {}).get("done")}
        if pending:
            async with server.snapshot() as (conn, at):
                if state is None:
                    # The stream starts where the first snapshot stands: committed first.
                    state = {"file": at.file, "pos": at.pos}
                    first = awaited(await ex.workers.run(partial(
                        prepare_records, ex.preparer, BINLOG, [], [], [], [], state=state)))
                    yield first
                    await first.committed
                for table in pending:
                    async for prepared in self._snapshot(ex, server, conn, table, at):
                        yield prepared
                    snapshots[table] = at.key
        assert state is not None
        async for prepared in self._stream(ex, server, Position(state["file"],
                                                                int(state["pos"])),
                                           frozenset(tables), snapshots):
            yield prepared

    async def _snapshot(self, ex: Extraction, server: _Server, conn: Any, table: str,
                        at: Position) -> AsyncIterator[Prepared]:
        """The table's rows in the snapshot, then its sweep; waits until committed."""
        from asyncmy.cursors import SSCursor

        src = server.src
        snapshot_id = time.time_ns() // 1000
        types = server.tables[table]
        state = {"file": at.file, "pos": at.pos, "snapshot": snapshot_id, "done": False}
        log.info("snapshot of a table", table=table, snapshot=snapshot_id,
                 position=f"{at.file}:{at.pos}")
        schema, _, bare = table.partition(".")
        cursor = conn.cursor(SSCursor)
        await cursor.execute(f"SELECT * FROM `{schema}`.`{bare}`")
        columns = [d[0] for d in cursor.description]
        kinds = [types.get(c, "") for c in columns]
        paced = Paced(conn, cursor)
        done = 0
        while rows := await paced.fetch(src.batch_size):
            yield await ex.workers.run(partial(
                snapshot_records, ex.preparer, table, columns, kinds, list(rows), done + 1,
                snapshot_id, {**state, "rows": done + len(rows)}))
            done += len(rows)
        await cursor.close()
        end = awaited(await ex.workers.run(partial(
            prepare_records, ex.preparer, table, [], [], [], [],
            state={**state, "done": True, "rows": done}, sweep=[(table, snapshot_id)])))
        yield end
        await end.committed
        log.info("snapshot of a table done", table=table, rows=done)

    async def _backfill(self, ex: Extraction, server: _Server,
                        bf: Backfill) -> AsyncIterator[Prepared]:
        """A key range of a table in a consistent snapshot, in key order, from the key after
        the checkpoint's; the binlog position is not touched. Each batch's read point is
        the binlog position the snapshot saw: a row whose live change is past it is left
        alone."""
        from asyncmy.cursors import SSCursor

        src = server.src
        table, key = bf.stream, src.fields.source_id
        assert table is not None and key is not None
        if table not in server.tables:
            raise server.fail(f"table {table} is not among the source's tables")
        state = ex.checkpoints.get(table) or {}
        bounds = [(op, value) for op, value in ((">=", bf.start), ("<=", bf.end),
                                                (">", state.get("after"))) if value is not None]
        where = " AND ".join(f"`{key}` {op} %s" for op, _ in bounds)
        schema, _, bare = table.partition(".")
        done = int(state.get("rows", 0))
        log.info("backfill of a table", table=table, start=bf.start, end=bf.end,
                 after=state.get("after"))
        async with server.snapshot() as (conn, at):
            number, pos = at.key
            cursor = conn.cursor(SSCursor)
            await cursor.execute(f"SELECT * FROM `{schema}`.`{bare}`"
                                 f"{' WHERE ' + where if where else ''} ORDER BY `{key}`",
                                 [v for _, v in bounds] or None)
            columns = [d[0] for d in cursor.description]
            kinds = [server.tables[table].get(c, "") for c in columns]
            paced, at_key = Paced(conn, cursor), columns.index(key)
            while rows := await paced.fetch(src.batch_size):
                yield await ex.workers.run(partial(
                    snapshot_records, ex.preparer, table, columns, kinds, list(rows),
                    done + 1, -bf.id, changes.backfill_state(bf, done + len(rows),
                                                             rows[-1][at_key]),
                    str(number << 32 | pos)))
                done += len(rows)
            await cursor.close()

    async def _stream(self, ex: Extraction, server: _Server, start: Position,
                      tables: frozenset[str],
                      snapshots: dict[str, tuple[int, int]]) -> AsyncIterator[Prepared]:
        """Passes over the binlog from ``start``: until caught up (``run``), or one every
        ``poll_interval_s`` for ever (``serve``)."""
        src = server.src
        key = src.fields.source_id
        assert key is not None
        server.position = start
        deadline: float | None = None
        building: Building[Txn] = Building()

        async def built() -> Prepared:
            prepared, txn = await building.next()
            server.position, server.last_at = txn.end, txn.timestamp   # past it on a re-read
            return prepared

        try:
            while ex.stopping is None or not ex.stopping.is_set():
                try:
                    async for txns in self._pass(server, server.position, tables):
                        building.add(ex.workers.run(build_changes, ex.preparer, txns,
                                                    snapshots, key), txns[-1])
                        if len(building) > 1:       # one builds while the next is read
                            yield await built()
                    while building:
                        yield await built()
                    deadline = None
                    await server.lag(server.position)
                    if ex.stopping is None:
                        return                          # `etlsvc run`: caught up
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ex.stopping.wait(), src.poll_interval_s)
                except Exception as exc:
                    building.drop()
                    # (A SourceError of a lost connection is one too: a pass's connect.)
                    if not _is_lost(exc.__cause__ if isinstance(exc, SourceError) else exc):
                        if isinstance(exc, SourceError):
                            raise
                        if getattr(exc, "args", (None,))[:1] == (1236,):
                            # The server cannot send from there: purged while streaming.
                            raise server.fail(
                                f"the server cannot send the binlog from {server.position.file}"
                                f":{server.position.pos}: {describe(exc)}. "
                                + RECOVERY.format(source=src.name)) from exc
                        raise server.fail(f"reading the binlog failed: {describe(exc)}") \
                            from exc
                    deadline = await wait_to_reconnect(deadline, src.reconnect_timeout_s, exc,
                                                       server.fail)
        finally:
            building.drop()

    async def _pass(self, server: _Server, start: Position,
                    tables: frozenset[str]) -> AsyncIterator[list[Txn]]:
        """One pass over the binlog from ``start`` in a thread: batches of whole
        transactions (the last may be only past the end of transactions of no table of
        ours, when they moved the position far)."""
        src = server.src
        out: queue.Queue[Any] = queue.Queue(maxsize=2)
        stop = threading.Event()
        reading = asyncio.ensure_future(asyncio.to_thread(
            read_binlog, server.settings, src.replica_id, start, tables,
            src.batch_size, out, stop))
        try:
            while True:
                try:
                    item = await asyncio.to_thread(out.get, True, 0.5)
                except queue.Empty:
                    if reading.done():
                        reading.result()
                        raise server.fail("the binlog reader stopped without a word") \
                            from None
                    continue
                if isinstance(item, _Failed):
                    raise item.exc
                if isinstance(item, _End):
                    return
                txns = [t for t in item if t.end.key > start.key]
                if not txns:
                    continue
                moved = any(t.rows or t.truncate for t in txns)
                if moved or _distance(start, txns[-1].end) >= IDLE_ADVANCE_BYTES:
                    yield txns
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await reading

    async def check(self, src: MysqlCdcSource, base_dir: Path) -> str:
        server = _Server(src)
        await server.check()
        files = await server.binlogs()
        return (f"{'MariaDB' if server.mariadb else 'MySQL'} binlog ({len(files)} files): "
                f"{', '.join(server.tables)}")


def _distance(a: Position, b: Position) -> int:
    return b.pos - a.pos if a.file == b.file else IDLE_ADVANCE_BYTES


def _is_lost(exc: BaseException) -> bool:
    """The server's connection is gone (or refused): worth another pass."""
    code = exc.args[0] if getattr(exc, "args", None) else None
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or (
        type(exc).__module__.startswith(("pymysql", "asyncmy")) and
        code in (2002, 2003, 2006, 2013, 2055, 1053))


KIND = MysqlCdcKind()
