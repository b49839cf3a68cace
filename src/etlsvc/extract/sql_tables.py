"""Kind ``sql``: the rows of a table or query in PostgreSQL or MySQL/MariaDB.

* Rows are streamed with a server-side cursor (asyncpg's cursor inside a read-only
  repeatable-read transaction; asyncmy's unbuffered ``SSCursor``), ``batch_size`` at a time:
  memory stays flat whatever the table's size.
* Incremental by a ``cursor`` column (a timestamp or an increasing id), with the same rule as
  API sources: the high-water mark is inclusive (``cursor >= mark``, in cursor order), and
  the keys of the rows exactly at the mark are remembered (``max_boundary_keys``) so that
  they are not loaded again while rows that share the mark and came later are. Rows whose
  cursor is NULL are read by the first run (and by ``--full-refresh``) only.
* Credentials come from the environment: ``url_env`` names a variable holding the whole URL,
  or ``password_env`` the password of ``url``. No secret is ever in the config file or a log.
* Each row lands in ``raw_sql_data`` as a JSON object {column: value} (timestamps as RFC
  3339, decimals as numbers, bytes as base64); fields map column names.

Why asyncmy for MySQL/MariaDB: it is asyncio-native, its protocol and row decoding are
compiled (Cython), it has a true unbuffered server-side cursor with bulk ``fetchmany``, and
it is maintained (SQLAlchemy ships a dialect for it). aiomysql is PyMySQL's pure-Python
protocol run on asyncio: the same API, several times the CPU per row.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import msgspec
import structlog

from etlsvc.contract import (
    BatchSize,
    Extraction,
    Fields,
    Prepared,
    Preparing,
    SourceConfig,
    SourceKind,
)
from etlsvc.errors import BackfillError, ConfigError, SourceError, describe
from etlsvc.extract.records import json_batch, text
from etlsvc.logs import redact

log = structlog.get_logger()

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
_SCHEMES = {"postgresql": "postgresql", "postgres": "postgresql", "mysql": "mysql",
            "mariadb": "mysql"}
_encode = msgspec.json.Encoder(enc_hook=str, decimal_format="number").encode


class SqlSource(SourceConfig, tag="sql", kw_only=True):
    """A table or query of a PostgreSQL or MySQL/MariaDB database."""

    #: ``postgresql://user@host:5432/db`` or ``mysql://user@host:3306/db``, without a
    #: password (see ``password_env``); or leave it out and set ``url_env``.
    url: str = ""
    #: Environment variable holding the whole URL, password included.
    url_env: str | None = None
    #: Environment variable holding the password of ``url``.
    password_env: str | None = None
    #: A table (``name`` or ``schema.name``), or else ``query``: a SELECT.
    table: str | None = None
    query: str | None = None
    #: Column to read incrementally by (a timestamp or an increasing number).
    cursor: str | None = None
    #: Keys remembered at the high-water mark (see the module docstring).
    max_boundary_keys: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    fields: Fields
    batch_size: BatchSize = 5_000

    kind = "sql"

    @property
    def relation(self) -> str:
        """What the rows come from, as the raw table records it."""
        return self.table or "query"


def connection_url(src: SqlSource) -> str:
    """The source's URL with its password from the environment; SourceError if unset."""
    if src.url_env:
        url = os.environ.get(src.url_env)
        if not url:
            raise SourceError(src.name, f"environment variable {src.url_env} (the URL of "
                              "this source's database) is not set")
        return url
    if src.password_env:
        password = os.environ.get(src.password_env)
        if password is None:
            raise SourceError(src.name, f"environment variable {src.password_env} (the "
                              "password of this source's database) is not set")
        parts = urlsplit(src.url)
        netloc = (f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@"
                  f"{parts.hostname}" + (f":{parts.port}" if parts.port else ""))
        return parts._replace(netloc=netloc).geturl()
    return src.url


def check_credentials(src: Any, where: str) -> None:
    """The keys of a database source's credentials (kinds sql, pg_cdc, mysql_cdc): ``url``
    or ``url_env``, one of them, and no password in ``url`` (``password_env`` names it)."""
    if bool(src.url) == bool(src.url_env):
        raise ConfigError(f"{where}.url': set url (with password_env for its password) "
                          "or url_env (a variable holding the whole URL), not both")
    if src.url and urlsplit(src.url).password is not None:
        raise ConfigError(f"{where}.url': no password in the config file: put it in an "
                          "environment variable named by password_env")


def _quote(name: str, engine: str) -> str:
    q = '"' if engine == "postgresql" else "`"
    return ".".join(f"{q}{part}{q}" for part in name.split("."))


def select(src: SqlSource, engine: str, since: bool, until: bool = False) -> str:
    """The SELECT of a run: the table or query, from the mark on (and up to a backfill's
    end), in cursor order."""
    base = (f"SELECT * FROM {_quote(src.table, engine)}" if src.table else
            f"SELECT * FROM ({src.query}) AS etlsvc_rows")
    if src.cursor is None:
        return base
    column = _quote(src.cursor, engine)
    bounds = [op for op, wanted in ((">=", since), ("<=", until)) if wanted]
    where = " AND ".join(f"{column} {op} {f'${i}' if engine == 'postgresql' else '%s'}"
                         for i, op in enumerate(bounds, 1))
    return (f"SELECT * FROM ({base}) AS etlsvc_src{' WHERE ' + where if where else ''} "
            f"ORDER BY {column}")


def _typed(value: Any, type_name: str) -> Any:
    """A backfill's bound (text) as asyncpg must be given a parameter of the column's type
    (PostgreSQL; MySQL compares text itself). ValueError if it is not one."""
    if not isinstance(value, str) or type_name in ("text", "varchar", "bpchar", "name"):
        return value
    if type_name in ("int2", "int4", "int8"):
        return int(value)
    if type_name in ("numeric", "float4", "float8"):
        return Decimal(value) if type_name == "numeric" else float(value)
    if type_name in ("timestamptz", "timestamp"):
        moment = dt.datetime.fromisoformat(value)
        if type_name == "timestamptz" and moment.tzinfo is None:
            return moment.replace(tzinfo=dt.UTC)
        return moment
    if type_name == "date":
        return dt.date.fromisoformat(value)
    if type_name == "uuid":
        return uuid.UUID(value)
    raise ValueError(f"a backfill cannot give a bound of a {type_name} column")


def fraction(start: str | None, end: str | None, at: Any) -> float | None:
    """How far ``at`` is from ``start`` to ``end`` where all three are numbers or times
    (a backfill's progress); None otherwise."""
    if start is None or end is None or at is None:
        return None
    scaled = _on_one_scale(start, end, at)
    if scaled is None:
        return None
    low, high, here = scaled
    return min(1.0, max(0.0, (here - low) / (high - low))) if high > low else None


def _on_one_scale(*values: Any) -> tuple[float, ...] | None:
    """``values`` all as numbers, else all as times (seconds since 1970); None if they are
    neither (text: only the database knows its order)."""
    for parse in (float, _moment):
        try:
            return tuple(parse(v) for v in values)
        except (TypeError, ValueError):
            continue
    return None


def _moment(value: Any) -> float:
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime.combine(value, dt.time())
    else:
        moment = dt.datetime.fromisoformat(str(value))
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def _mark_value(state: dict[str, Any]) -> Any:
    """The high-water mark as the driver must be given it (it is stored as JSON)."""
    value, typ = state["hwm"], state.get("hwm_type")
    if typ == "datetime":
        return dt.datetime.fromisoformat(value)
    if typ == "date":
        return dt.date.fromisoformat(value)
    if typ == "decimal":
        return Decimal(value)
    return value


def _as_mark(value: Any) -> tuple[Any, str]:
    """A cursor value as JSON, and its type."""
    if isinstance(value, dt.datetime):
        return value.isoformat(), "datetime"
    if isinstance(value, dt.date):
        return value.isoformat(), "date"
    if isinstance(value, Decimal):
        return str(value), "decimal"
    return value, type(value).__name__


@asynccontextmanager
async def _rows(src: SqlSource, engine: str, url: str, sql: str,
                args: list[Any]) -> AsyncIterator[tuple[list[str], Any]]:
    """(column names, ``fetch(n)``) of a server-side cursor over ``sql``."""
    if engine == "postgresql":
        conn = await asyncpg.connect(url, timeout=30)
        try:
            for typ in ("json", "jsonb"):         # JSON columns stay JSON in the record
                await conn.set_type_codec(typ, schema="pg_catalog", format="text",
                                          encoder=str, decoder=msgspec.json.decode)
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                statement = await conn.prepare(sql)
                try:
                    args = [_typed(a, t.name) for a, t in zip(args, statement.get_parameters(),
                                                              strict=True)]
                except ValueError as exc:
                    raise SourceError(src.name, f"{src.cursor}: {exc}") from None
                cursor = await statement.cursor(*args)
                yield [a.name for a in statement.get_attributes()], cursor.fetch
        finally:
            await conn.close()
        return
    import asyncmy  # only for MySQL sources
    from asyncmy.cursors import SSCursor

    parts = urlsplit(url)
    conn = await asyncmy.connect(
        host=parts.hostname or "127.0.0.1", port=parts.port or 3306,
        user=unquote(parts.username or ""), password=unquote(parts.password or ""),
        database=parts.path.lstrip("/") or None, connect_timeout=30)
    try:
        # Reading is paused between batches (below): the server must not give up on a
        # result whose client waits for a slow commit (net_write_timeout is 60 s).
        async with conn.cursor() as setup:
            await setup.execute("SET SESSION net_write_timeout = 3600")
        cursor = conn.cursor(SSCursor)
        await cursor.execute(sql, args or None)
        columns = [d[0] for d in cursor.description]
        yield columns, Paced(conn, cursor).fetch
        await cursor.close()
    finally:
        conn.close()


class Paced:
    """``fetchmany`` of asyncmy's unbuffered cursor, with the socket read at the pace the
    rows are taken.

    asyncmy's protocol copies whatever the server sends into a receive buffer that grows
    without limit: while batches commit, a whole 1,000,000-row result (hundreds of MiB)
    piles up there. Here, between fetches, reading stops once ``HIGH`` bytes wait, and
    resumes for the next fetch; TCP's window then holds the server back. Reading is never
    paused during a fetch, which may need more bytes to finish a row.
    """

    HIGH = 4 << 20

    def __init__(self, conn: Any, cursor: Any) -> None:
        self.cursor = cursor
        self.transport = conn._transport
        self.proto = conn._proto
        self.fetching = False
        received = self.proto.buffer_updated

        def buffer_updated(nbytes: int) -> None:
            received(nbytes)
            if not self.fetching:
                self._pause_if_full()

        # asyncio looks the callback up on the protocol at each read: the instance's wins
        self.proto.buffer_updated = buffer_updated

    def _pause_if_full(self) -> None:
        if self.proto.length - self.proto.pos > self.HIGH and self.transport.is_reading():
            self.transport.pause_reading()

    async def fetch(self, size: int) -> list[Any]:
        self.fetching = True
        if not self.transport.is_reading():
            self.transport.resume_reading()
        try:
            return await self.cursor.fetchmany(size)
        finally:
            self.fetching = False
            self._pause_if_full()


def engine_of(src: SqlSource, url: str) -> str:
    """``postgresql`` or ``mysql``, from the URL's scheme."""
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in _SCHEMES:
        raise SourceError(src.name, f"not a PostgreSQL or MySQL URL: {redact(url)!r}")
    return _SCHEMES[scheme]


#: raw_sql_data.version of a row without one (0015_backfill.sql).
NO_VERSION = -(1 << 63)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def version_of(value: Any) -> int:
    """A cursor value as a row's source version: an integer as it is, a time in
    microseconds since 1970 (a naive one taken as UTC); NO_VERSION for anything else."""
    if isinstance(value, bool):
        return NO_VERSION
    if isinstance(value, int):
        return value if -(1 << 63) < value < (1 << 63) else NO_VERSION
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return (aware - _EPOCH) // dt.timedelta(microseconds=1)
    if isinstance(value, dt.date):
        return (value - _EPOCH.date()) // dt.timedelta(microseconds=1)
    return NO_VERSION


def prepare_rows(preparer: Preparing, relation: str, columns: list[str],
                 rows: list[tuple[Any, ...]], first: int, state: dict[str, Any],
                 keep: list[bool], read_point: str | None = None) -> Prepared:
    """In a worker: rows of the source's result → records → a prepared batch (each row's
    version its cursor value; ``read_point``: a backfill's batch)."""
    raws = [_encode(dict(zip(columns, row))) for row in rows]
    items = list(map(msgspec.json.decode, raws))     # as the SQL will see them: JSON values
    cursor = preparer.src.cursor                      # type: ignore[attr-defined]
    at = columns.index(cursor) if cursor in columns else None
    batch = json_batch(preparer.src, relation, items, raws,
                       [(first + i, NO_VERSION if at is None else version_of(row[at]))
                        for i, row in enumerate(rows)], SqlKind.position_keys,
                       keep=keep, state=state, bytes_read=sum(map(len, raws)), flat=True)
    batch.read_point = read_point
    return preparer(batch)


class SqlKind(SourceKind):
    """A SQL table or query; see the module docstring."""

    name = "sql"
    config = SqlSource
    raw_table = "raw_sql_data"
    stream_column = "relation"
    position_columns = ("row_number", "version")
    position_keys = ("row", "version")
    record = "columns"
    backfill_range = ("values of the cursor column (of the key column, for a source "
                      "without a cursor), inclusive")
    # A row's version is its cursor value: a backfilled row older than the live one (by
    # the cursor) is left alone. Without a cursor, the last write wins.
    version_sql = f"NULLIF(r.version, {NO_VERSION})"
    seen_sql = "{v} <= {new}"

    def whole_read(self, src: SqlSource) -> str | None:
        return ("a sql source with a cursor reads only the rows past its mark"
                if src.cursor else None)

    def check_config(self, src: SqlSource, where: str) -> None:
        check_credentials(src, where)
        if src.url and urlsplit(src.url).scheme.split("+")[0] not in _SCHEMES:
            raise ConfigError(f"{where}.url': expected postgresql:// or mysql://, got "
                              f"{redact(src.url)!r}")
        if bool(src.table) == bool(src.query):
            raise ConfigError(f"{where}.table': set table or query (one of them)")
        for key in ("table", "cursor"):
            value = getattr(src, key)
            if value is not None and not _IDENTIFIER.match(value):
                raise ConfigError(f"{where}.{key}': not a plain column or table name: "
                                  f"{value!r}")

    def check_backfill(self, src: SqlSource, stream: str | None, start: str | None,
                       end: str | None) -> str | None:
        super().check_backfill(src, stream, start, end)
        if start is not None and end is not None and \
                (scaled := _on_one_scale(start, end)) is not None and scaled[0] > scaled[1]:
            raise BackfillError(f"--from {start} is after --to {end}", "bad_range")
        return None

    async def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        src: SqlSource = ex.src
        bf = ex.backfill
        if bf is not None:
            # A range of the cursor column (of the key column without one), read like a
            # live run from a mark, up to the range's end.
            src = msgspec.structs.replace(src, cursor=src.cursor or src.fields.source_id)
        url = connection_url(src)
        engine = engine_of(src, url)
        state = ex.checkpoints.get(src.relation) or {}
        since = src.cursor is not None and state.get("hwm") is not None
        # The mark this read starts from, and the keys loaded exactly at it already.
        mark = _mark_value(state) if since else None
        boundary = set(state.get("boundary", [])) if since else set()
        if bf is not None and not since and bf.start is not None:
            since, mark = True, bf.start
        until = bf is not None and bf.end is not None
        sql = select(src, engine, since, until)
        args = [*([mark] if since else []), *([bf.end] if bf and until else [])]
        log.info("reading", relation=src.relation, since=mark,
                 until=bf.end if bf and until else None, backfill=bf.id if bf else None)
        try:
            async with _rows(src, engine, url, sql, args) as (columns, fetch):
                self._check_columns(src, columns)
                cursor_col = columns.index(src.cursor) if src.cursor else None
                key_col = columns.index(src.fields.source_id)
                first = 1
                while rows := await fetch(src.batch_size):
                    rows = list(map(tuple, rows))
                    keep = [not (r[cursor_col] == mark and text(r[key_col]) in boundary)
                            for r in rows] if boundary else [True] * len(rows)
                    state = self._advance(src, state, rows, cursor_col, key_col)
                    if bf is not None:
                        state = {**state, "at": state.get("hwm"),
                                 "fraction": fraction(bf.start, bf.end, state.get("hwm"))}
                    yield await ex.workers.run(prepare_rows, ex.preparer, src.relation,
                                               columns, rows, first, state, keep,
                                               None if bf is None else "")
                    first += len(rows)
        except (asyncpg.PostgresError, OSError) as exc:
            raise SourceError(src.name, f"{engine} query failed: {describe(exc)}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("asyncmy"):
                raise SourceError(src.name, f"mysql query failed: {describe(exc)}") from exc
            raise

    @staticmethod
    def _advance(src: SqlSource, state: dict[str, Any], rows: list[tuple[Any, ...]],
                 cursor_col: int | None, key_col: int) -> dict[str, Any]:
        """The checkpoint after ``rows``: the mark (the last non-null cursor value, rows
        being in cursor order) and the keys exactly at it."""
        if cursor_col is None:
            return {"rows": state.get("rows", 0) + len(rows)}
        hwm, boundary = state.get("hwm"), list(state.get("boundary", []))
        typ = state.get("hwm_type")
        for row in rows:
            value = row[cursor_col]
            if value is None:
                continue
            mark, typ_now = _as_mark(value)
            key = text(row[key_col])
            if mark != hwm:
                hwm, typ, boundary = mark, typ_now, [key]
            elif key not in boundary and len(boundary) < src.max_boundary_keys:
                boundary.append(key)
        return {"hwm": hwm, "hwm_type": typ, "boundary": boundary}

    @staticmethod
    def _check_columns(src: SqlSource, columns: list[str]) -> None:
        wanted = [*src.fields.mapped().values(), *([src.cursor] if src.cursor else [])]
        if absent := [c for c in wanted if c not in columns]:
            raise SourceError(src.name, f"{src.relation}: column "
                              f"{', '.join(map(repr, absent))} not in the result (columns: "
                              f"{', '.join(columns)})")

    async def check(self, src: SqlSource, base_dir: Path) -> str:
        url = connection_url(src)
        engine = engine_of(src, url)
        sql = f"SELECT * FROM ({select(src, engine, False)}) AS etlsvc_check LIMIT 0"
        try:
            async with _rows(src, engine, url, sql, []) as (columns, _):
                self._check_columns(src, columns)
        except (asyncpg.PostgresError, OSError) as exc:
            raise SourceError(src.name, f"{engine}: {describe(exc)}") from exc
        return f"{engine} {src.relation}: {len(columns)} columns, mapped columns present"


KIND = SqlKind()
