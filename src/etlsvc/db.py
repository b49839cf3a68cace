"""PostgreSQL access: the pool, the SQL files in ``sql/``, migrations.

Owns connecting (to the configured URL or the embedded server), loading named queries
from ``sql/queries/*.sql`` and applying ``sql/migrations/NNNN_*.sql`` in order under an
advisory lock. asyncpg errors at connect time become :class:`DatabaseError` here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import hashlib
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
import structlog

from etlsvc.config import Config
from etlsvc.embedded import EmbeddedPostgres
from etlsvc.errors import DatabaseError
from etlsvc.logs import redact

log = structlog.get_logger()
T = TypeVar("T")

#: The largest bigint: the top of every id range (row ids, run ids, positions).
MAX_ID = 2**63 - 1
_MIGRATION_LOCK = 0x6574_6C73_7663_0001  # "etlsvc" + 1: one key for every etlsvc process
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


#: Errors that mean the database is away (down, restarting, unreachable, connection lost),
#: as opposed to an error in what was asked of it. InternalClientError is what asyncpg
#: raises when it resets a pooled connection the server has just dropped.
UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
               asyncpg.InternalClientError, asyncpg.AdminShutdownError,
               asyncpg.CrashShutdownError, asyncpg.CannotConnectNowError,
               asyncpg.TooManyConnectionsError)


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is away rather than that a statement failed."""
    return isinstance(exc, UNAVAILABLE)


#: A transaction PostgreSQL rolled back for no fault of its own: it chose it to break a
#: deadlock with another session (40P01), or could not serialize it with others (40001).
#: The same transaction, done again, is right.
TRANSIENT = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
TRANSIENT_ATTEMPTS = 5


async def again_if_transient(transaction: Callable[[], Awaitable[T]], what: str) -> T:
    """``transaction()`` (which opens and commits its own transaction), done again, up to
    ``TRANSIENT_ATTEMPTS`` times in all, while it ends in a :data:`TRANSIENT` error."""
    attempt = 1
    while True:
        try:
            return await transaction()
        except TRANSIENT as exc:
            if attempt >= TRANSIENT_ATTEMPTS:
                raise
            log.warning(f"{what} rolled back by the database; doing it again",
                        sqlstate=exc.sqlstate, reason=str(exc).splitlines()[0],
                        attempt=attempt)
            # jittered, growing: two sessions that deadlock again would keep doing so
            await asyncio.sleep(random.uniform(0.05, 0.1) * 2 ** attempt)
            attempt += 1


@contextlib.asynccontextmanager
async def failing_fast(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Fail at once, with ConnectionDoesNotExistError, if ``conn`` is lost inside the block.

    asyncpg's COPY waits for write flow control without a timeout; when the connection is
    lost while writing is paused, nothing wakes it and the run would hang forever. The
    connection's termination listener makes a timeout around the block expire instead.
    """
    lost = False
    inside = True
    async with asyncio.timeout(None) as limit:

        def on_lost(_: object) -> None:
            nonlocal lost
            if inside:
                lost = True
                limit.reschedule(asyncio.get_running_loop().time())

        conn.add_termination_listener(on_lost)
        try:
            yield
        except Exception as exc:    # e.g. the rollback of the interrupted COPY failing
            if lost:
                raise asyncpg.ConnectionDoesNotExistError(
                    "the connection was lost in the middle of a batch") from exc
            raise
        finally:
            inside = False
            # A connection lost with the database may be back in the pool already, where
            # asyncpg refuses to touch it: the listener, now inert, goes with it.
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.remove_termination_listener(on_lost)


def sql_dir() -> Path:
    """``sql/`` inside the installed package (wheel), else at the root of the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parents[1] / "sql"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise DatabaseError(f"SQL files not found next to {here}")


@cache
def queries(name: str) -> dict[str, str]:
    """Named queries of ``sql/queries/<name>.sql`` (each starts with a ``-- name: x`` line)."""
    text = (sql_dir() / "queries" / f"{name}.sql").read_text()
    parts = re.split(r"^-- name: (\w+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def query(file: str, name: str) -> str:
    """One named query from ``sql/queries/<file>.sql``."""
    return queries(file)[name]


async def commit_async(conn: asyncpg.Connection) -> None:
    """This session's commits return before their WAL is flushed (a batch's commit: see
    ``sql/queries/session.sql``)."""
    await conn.execute(query("session", "commit_async"))


async def responds(conn: asyncpg.Connection, within: float) -> bool:
    """Whether ``conn`` still reaches the server within ``within`` seconds."""
    try:
        await conn.fetchval(query("session", "ping"), timeout=within)
    except Exception:
        return False
    return True


async def try_lock(conn: asyncpg.Connection, key: str) -> bool:
    """Take the session-level advisory lock ``key`` if it is free (``sql/queries/locks.sql``
    names the keys)."""
    return await conn.fetchval(query("locks", "try_lock"), key)


async def unlock(conn: asyncpg.Connection, key: str) -> None:
    await conn.execute(query("locks", "unlock"), key)


async def xact_lock(conn: asyncpg.Connection, key: str, *, wait: bool) -> bool:
    """The transaction-level advisory lock ``key``: waiting for it, or only if it is free;
    whether it was taken."""
    if wait:
        await conn.execute(query("locks", "xact_lock"), key)
        return True
    return await conn.fetchval(query("locks", "try_xact_lock"), key)


async def init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, schema="pg_catalog", encoder=json_text,
                                  decoder=msgspec.json.decode, format="text")


def json_text(value: object) -> str:
    """What etlsvc sends PostgreSQL for a json or jsonb value: a string as the JSON text it
    already is, anything else encoded by msgspec."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def tls(cfg: Config) -> ssl.SSLContext | bool | None:
    """What ``[database] sslmode`` asks of the connections to ``database.url`` and
    ``read_url`` (None: what the URL says)."""
    mode = cfg.database.sslmode
    if not mode:
        return None
    if mode == "disable":
        return False
    if mode == "require":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    cafile = cfg.resolve(cfg.database.sslrootcert)
    try:
        context = ssl.create_default_context(cafile=str(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise DatabaseError(f"cannot read database.sslrootcert {str(cafile)!r}: {exc}") from exc
    context.check_hostname = mode == "verify-full"
    return context


async def connect_pool(dsn: str, cfg: Config, settings: dict[str, str] | None = None,
                       **kwargs: object) -> asyncpg.Pool:
    """An asyncpg pool with JSON codecs and UTC sessions, over TLS as ``[database]
    sslmode`` says (not for the embedded server's socket); DatabaseError if unreachable."""
    if cfg.database.url and (context := tls(cfg)) is not None:
        kwargs["ssl"] = context
    try:
        return await asyncpg.create_pool(
            dsn, min_size=cfg.database.min_pool_size, max_size=cfg.database.max_pool_size,
            timeout=cfg.database.connect_timeout, init=init_connection,
            server_settings={"application_name": "etlsvc", "timezone": "UTC",
                             **(settings or {})}, **kwargs)
    except ssl.SSLCertVerificationError as exc:
        raise DatabaseError(
            f"cannot connect to PostgreSQL at {redact(dsn)}: its TLS certificate was not "
            f"accepted ({exc.verify_message.rstrip('.')}): it must be signed by the CA of "
            "sslrootcert and, for verify-full, name the URL's host") from exc
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL at {redact(dsn)}: {exc}") from exc


@dataclass(frozen=True)
class ReadScope:
    """Whom a read of the API is for: a tenant, whose sources and the sources shared with it
    row-level security lets the read see (``sql/migrations/0017_tenants.sql``), narrowed to
    those matching ``sources`` (SQL LIKE patterns; none: no narrowing)."""

    tenant: str
    sources: tuple[str, ...] = ()

    @cached_property
    def prelude(self) -> str:
        """What opens each of its transactions: the tenant and the patterns, ``SET LOCAL``.
        One simple-protocol message (a round trip, not three) of utility statements, which
        PostgreSQL runs without planning: half the cost of ``SELECT set_config(…)``."""
        return (f"BEGIN; SET LOCAL etlsvc.tenant = {_literal(self.tenant)}; "
                f"SET LOCAL etlsvc.sources = {_literal(chr(10).join(self.sources))}")


def _literal(text: str) -> str:
    """A PostgreSQL string literal of ``text`` (standard_conforming_strings is on)."""
    if "\x00" in text:
        raise ValueError("a NUL cannot be in a PostgreSQL string")
    return "'" + text.replace("'", "''") + "'"


#: Whom the current request reads for (set by the API's key check). None: nobody, and the
#: row-level security policies let such a read see no row of any source.
READ_SCOPE: contextvars.ContextVar[ReadScope | None] = contextvars.ContextVar(
    "read_scope", default=None)
_NOBODY = "BEGIN"


class InTurn:
    """The read API's pool: each read is a transaction of its own for the request's
    ``READ_SCOPE``, and connections go to requests in the order they asked (FIFO).

    The pool's connections are the role ``etlsvc_api`` (the startup parameter ``role``),
    which the row-level security policies hold to the tenant each transaction names; so a
    handler's query that leaves out the tenant, or reads with none, still sees only its
    tenant's rows, or none.

    A read's transaction costs two round trips more than its query: its prelude and its
    end. The end travels with the next read's prelude instead: a read that finishes while
    others wait hands its connection, transaction still open, straight to the first of
    them, which sends ``ROLLBACK; BEGIN; …`` in one message; with nobody waiting, the
    connection is parked, transaction open, for the next read to come within ``PARK_S``.
    One that nobody took by then has its transaction ended and goes back to the pool, so
    no connection idles in a transaction (holding its locks) while the API is quiet.

    asyncpg hands a released connection to whoever asks next, and a request that has just
    arrived can take it ahead of those already waiting. With the read pool's free release
    (no reset round trip), at 50 concurrent requests on 10 connections that made latency
    bimodal: p90 twice p50. Here turns go to waiters in the order they asked.
    ``fetch``/``fetchrow``/``fetchval`` take a turn; anything else goes to the pool.
    """

    #: Seconds a parked connection keeps its transaction open for the next read.
    PARK_S = 0.05

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        #: Turns nobody holds: as many as the pool has connections, so that whoever holds
        #: a turn has a connection handed to it, takes a parked one, or gets one from the
        #: pool at once (connections out of the pool: those of held turns and parked ones,
        #: and no more are parked than there are free turns).
        self._free = pool.get_max_size()
        #: Reads waiting for a turn; each is given a connection (transaction open) or None.
        self._waiting: collections.deque[asyncio.Future[asyncpg.Connection | None]] = \
            collections.deque()
        #: Connections whose transaction is still open, with when they were parked.
        self._parked: list[tuple[float, asyncpg.Connection]] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._giving_back: set[asyncio.Task[None]] = set()

    async def _read(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        scope = READ_SCOPE.get()
        prelude = _NOBODY if scope is None else scope.prelude
        conn = await self._turn()
        if conn is None:
            conn = self._unpark()
        if conn is None:
            try:
                conn = await self.pool.acquire()
            except BaseException:
                self._pass(None)
                raise
        else:
            prelude = "ROLLBACK; " + prelude
        try:
            await conn.execute(prelude)
            result = await getattr(conn, method)(*args, **kwargs)
        except asyncio.CancelledError:
            # Its query may still be on the wire: asyncpg's release waits for it to be
            # cancelled and rolls back what it left open.
            await self._give_back(conn, end=False)
            raise
        except BaseException:
            await self._give_back(conn)
            raise
        if not self._pass(conn):
            self._park(conn)
        return result

    async def _turn(self) -> asyncpg.Connection | None:
        """Wait for a turn. With it comes the connection of the read before, its
        transaction still open, or None: take a parked one, or one from the pool."""
        if self._free and not self._waiting:
            self._free -= 1
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Handed a turn just as it was cancelled: pass it on, not lose it.
                handed = waiter.result()
                if not self._pass(handed):
                    self._park(handed)
            raise

    def _pass(self, conn: asyncpg.Connection | None) -> bool:
        """Hand the turn to the first read still waiting, with ``conn`` (transaction open)
        or None. False if none waits and there is a connection: the caller parks it."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        if conn is not None:
            return False
        self._free += 1
        return True

    def _park(self, conn: asyncpg.Connection) -> None:
        """Keep ``conn``, transaction open, for the next read; free the turn."""
        loop = asyncio.get_running_loop()
        self._parked.append((loop.time(), conn))
        self._free += 1
        if self._sweep is None:
            self._sweep = loop.call_later(self.PARK_S, self._end_parked)

    def _unpark(self) -> asyncpg.Connection | None:
        """The connection parked last (its transaction still open), if any."""
        while self._parked:
            conn = self._parked.pop()[1]
            if not conn.is_closed():
                return conn
            self._in_background(self._release(conn, end=False))
        return None

    def _end_parked(self, everyone: bool = False) -> None:
        """Give back the connections parked for ``PARK_S`` or more (all: ``everyone``)."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        since = loop.time() - self.PARK_S
        # Parked in the order of their time (the last parked is the first taken): the
        # stale ones come first.
        n = len(self._parked) if everyone else sum(at <= since for at, _ in self._parked)
        stale, self._parked = self._parked[:n], self._parked[n:]
        for _, conn in stale:
            self._in_background(self._release(conn))
        if self._parked:
            self._sweep = loop.call_later(self._parked[0][0] - since, self._end_parked)

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def _release(self, conn: asyncpg.Connection, end: bool = True) -> None:
        """End the connection's transaction and return it to the pool."""
        try:
            if end and not conn.is_closed():
                # Ended here: asyncpg's release would too, but report it as a mistake.
                with contextlib.suppress(*UNAVAILABLE, asyncpg.PostgresError):
                    await conn.execute("ROLLBACK")
        finally:
            # Even if the read is cancelled while its transaction ends (its client hung
            # up): the release waits for the cancelled ROLLBACK and rolls back itself.
            await self.pool.release(conn)

    async def _give_back(self, conn: asyncpg.Connection, end: bool = True) -> None:
        """Return a read's connection to the pool and pass its turn on."""
        try:
            await self._release(conn, end)
        finally:
            self._pass(None)

    async def fetch(self, *args: Any, **kwargs: Any) -> list[asyncpg.Record]:
        return await self._read("fetch", args, kwargs)

    async def fetchrow(self, *args: Any, **kwargs: Any) -> asyncpg.Record | None:
        return await self._read("fetchrow", args, kwargs)

    async def fetchval(self, *args: Any, **kwargs: Any) -> Any:
        return await self._read("fetchval", args, kwargs)

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._end_parked(everyone=True)
        await asyncio.gather(*self._giving_back, return_exceptions=True)
        await self.pool.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


@dataclass
class Database:
    """An open pool, and the embedded server behind it if there is one."""

    pool: asyncpg.Pool
    dsn: str
    embedded: EmbeddedPostgres | None
    #: ``database.reconnect_timeout``: how long a run waits for a lost database.
    reconnect_timeout: float = 60.0


async def sync_source_settings(pool: asyncpg.Pool, cfg: Config) -> None:
    """Each source's ``history_days`` where the versioning triggers read it
    (``sql/migrations/0016_versions.sql``), and its tenant, description and tags where the
    row-level security policies and the catalog read them (``0017_tenants.sql``), and the
    shares the config makes (``[sources.share]``; those made by the API stay)."""
    names = [s.name for s in cfg.sources]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(query("versions", "sync_settings"), names,
                           [s.history_days for s in cfg.sources])
        await conn.execute(query("tenants", "sync_sources"), names,
                           [s.tenant for s in cfg.sources],
                           [s.description for s in cfg.sources],
                           msgspec.json.encode([s.tags for s in cfg.sources]).decode())
        shares = [(s.name, t, s.share.fields) for s in cfg.sources if s.share
                  for t in s.share.tenants]
        await conn.execute(query("tenants", "sync_shares"), [s[0] for s in shares],
                           [s[1] for s in shares],
                           msgspec.json.encode([s[2] for s in shares]).decode())


@contextlib.asynccontextmanager
async def open_database(cfg: Config, *, migrate: bool = True) -> AsyncIterator[Database]:
    """Connect (starting the embedded server when no URL is set), migrate, yield, close."""
    embedded = None
    dsn = cfg.database.url
    if not dsn:
        embedded = EmbeddedPostgres(cfg.embedded_dir, cfg.embedded.pg_version)
        dsn = embedded.start()
    try:
        pool = await connect_pool(dsn, cfg)
        try:
            if migrate:
                await apply_migrations(pool)
                await sync_source_settings(pool, cfg)
            yield Database(pool, dsn, embedded, cfg.database.reconnect_timeout)
        finally:
            await pool.close()
    finally:
        if embedded:
            embedded.stop()


def migration_files() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration, in order."""
    found = []
    for path in sorted((sql_dir() / "migrations").glob("*.sql")):
        m = _MIGRATION_NAME.match(path.name)
        if not m:
            raise DatabaseError(f"migration file name {path.name!r} is not NNNN_name.sql")
        found.append((int(m.group(1)), path.name, path.read_text()))
    return found


async def apply_migrations(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations under an advisory lock; return the names applied."""
    applied_now = []
    async with pool.acquire() as conn:
        await conn.execute(query("migrations", "lock"), _MIGRATION_LOCK)
        try:
            await conn.execute(query("migrations", "create_table"))
            done = {r["version"]: r["checksum"]
                    for r in await conn.fetch(query("migrations", "applied"))}
            for version, name, sql in migration_files():
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if version in done:
                    if done[version] != checksum:
                        raise DatabaseError(f"migration {name} was changed after it was applied"
                                            " to this database; add a new migration instead")
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(query("migrations", "record"), version, name, checksum)
                log.info("migration applied", migration=name)
                applied_now.append(name)
        finally:
            await conn.execute(query("migrations", "unlock"), _MIGRATION_LOCK)
    return applied_now
