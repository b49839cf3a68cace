"""The ``etlsvc`` command: run, backfill, replay, rejects, purge, serve, keys, migrate,
check, logs, cdc, health.

Owns argument parsing, exit codes (0 success, 1 a run or check failed, 2 bad usage or
config) and what a person at a terminal sees: a progress bar and a summary table on stderr,
while the structured logs go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import getpass
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import structlog
import uvicorn

from etlsvc import __version__, db, logtail
from etlsvc.config import Config, Source, config_path, load_config
from etlsvc.contract import DEFAULT_TENANT
from etlsvc.errors import AccessError, ConfigError, EtlError, SourceBusy
from etlsvc.extract import mysql_cdc, pg_cdc
from etlsvc.load import checkpoint
from etlsvc.logs import configure_logging
from etlsvc.runtime import (
    audit,
    backfill,
    keys,
    notify,
    pipeline,
    replay,
    retention,
    retry,
    rollback,
    runs,
)
from etlsvc.runtime.workers import from_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    # Accepted before the command and after it; SUPPRESS keeps one from erasing the other.
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $ETLSVC_CONFIG, else ./config.toml)")
    parser = _Parser(prog="etlsvc", description="Self-hosted ETL service.",
                     parents=[common])
    parser.add_argument("--version", action="version", version=f"etlsvc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", parents=[common], help="run sources once and exit")
    run.add_argument("sources", nargs="*", metavar="SOURCE",
                     help="sources to run (default: all)")
    run.add_argument("--full-refresh", action="store_true",
                     help="ignore checkpoints and read everything again")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    fill = sub.add_parser("backfill", parents=[common],
                          help="read a range of a source again, beside its live run, without "
                               "moving its cursor or slot (again: goes on where it stopped)")
    fill.add_argument("source", nargs="?", metavar="SOURCE")
    fill.add_argument("--from", dest="start", default=None, metavar="X",
                      help="start of the range, inclusive (what it is depends on the kind: "
                           "see README)")
    fill.add_argument("--to", dest="end", default=None, metavar="Y",
                      help="end of the range, inclusive")
    fill.add_argument("--table", default=None, metavar="TABLE",
                      help="pg_cdc, mysql_cdc: the table (default: the source's only one)")
    fill.add_argument("--list", action="store_true", help="list backfills (of SOURCE)")
    fill.add_argument("--cancel", type=int, default=None, metavar="ID",
                      help="stop backfill ID (a running one stops within a second)")
    fill.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay = sub.add_parser("replay", parents=[common],
                            help="normalize a source again from its raw rows")
    replay.add_argument("source", metavar="SOURCE")
    back = sub.add_parser("rollback", parents=[common],
                          help="make a source's rows what they were right after one of its "
                               "runs, in one transaction")
    back.add_argument("source", metavar="SOURCE")
    back.add_argument("--to-run", type=int, required=True, metavar="N",
                      help="the run whose end to go back to")
    back.add_argument("--keep-position", action="store_true",
                      help="leave the checkpoints: the next run does not read again what "
                           "was rolled back")
    back.add_argument("--dry-run", action="store_true",
                      help="print what would change, change nothing")
    rejects = sub.add_parser("rejects", parents=[common],
                             help="retry rejected records under the current rules, or "
                                  "ignore them")
    rejects_sub = rejects.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, text in (("retry", "validate open rejects again and load the valid ones"),
                         ("ignore", "mark open rejects as ignored")):
        cmd = rejects_sub.add_parser(action, parents=[common], help=text)
        cmd.add_argument("source", metavar="SOURCE")
        cmd.add_argument("--run", type=int, default=None, metavar="N",
                         help="only the rejects of run N")
        cmd.add_argument("--id", type=int, action="append", default=None, dest="ids",
                         metavar="ID", help="only this reject (repeatable)")
    purge = sub.add_parser("purge", parents=[common],
                           help="delete raw rows and rejects older than retention_days, and "
                                "versions replaced longer ago than history_days")
    purge.add_argument("sources", nargs="*", metavar="SOURCE",
                       help="sources to purge (default: all with retention_days or "
                            "history_days)")
    serve = sub.add_parser("serve", parents=[common],
                           help="run the HTTP API and the scheduler")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    logs = sub.add_parser("logs", help="pretty-print and filter an etlsvc JSON log stream")
    logs.add_argument("file", nargs="?", default="-", help="log file (default: stdin)")
    logs.add_argument("-f", "--follow", action="store_true", help="wait for new lines")
    logs.add_argument("--level", default="debug", choices=list(logtail.LEVELS),
                      help="lowest level shown")
    logs.add_argument("--run-id", type=int, default=None, help="only this run")
    logs.add_argument("--source", default=None, help="only this source")
    cdc = sub.add_parser("cdc", parents=[common], help="manage a change source's position "
                         "in its database's log")
    cdc_sub = cdc.add_subparsers(dest="action", required=True, parser_class=_Parser)
    reset = cdc_sub.add_parser("reset", parents=[common],
                               help="forget the source's checkpoints (and drop its replication "
                                    "slot, pg_cdc): its next run snapshots the tables anew")
    reset.add_argument("source", metavar="SOURCE")
    drop = cdc_sub.add_parser("drop-slot", parents=[common],
                              help="pg_cdc: drop the source's replication slot and forget its "
                                   "checkpoints (as reset)")
    drop.add_argument("source", metavar="SOURCE")
    keys_cmd = sub.add_parser("keys", parents=[common],
                              help="make, list, rotate and revoke API keys")
    keys_sub = keys_cmd.add_subparsers(dest="action", required=True, parser_class=_Parser)
    create = keys_sub.add_parser("create", parents=[common],
                                 help="make a key; its secret is printed once (stdout)")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--tenant", default=DEFAULT_TENANT, help="its tenant (default: "
                        "default)")
    create.add_argument("--scope", default="read", choices=list(keys.SCOPES),
                        help="read (default), run or admin")
    create.add_argument("--source", action="append", default=[], dest="sources",
                        metavar="GLOB", help="limit it to these sources (repeatable)")
    create.add_argument("--hide", action="append", default=[], dest="hidden",
                        choices=list(keys.HIDEABLE), metavar="FIELD",
                        help="leave this field out of what it reads (repeatable)")
    create.add_argument("--expires-in-days", type=float, default=None, metavar="D",
                        help="it stops working after D days")
    listing = keys_sub.add_parser("list", parents=[common], help="list keys")
    listing.add_argument("--tenant", default=None, help="only this tenant's")
    rotate = keys_sub.add_parser("rotate", parents=[common],
                                 help="a new secret for key ID (printed once); the old one "
                                      "works for the grace period")
    rotate.add_argument("key_id", type=int, metavar="ID")
    rotate.add_argument("--grace", type=float, default=3600, metavar="SECONDS",
                        help="how long the old secret keeps working (default 3600)")
    revoke = keys_sub.add_parser("revoke", parents=[common],
                                 help="revoke key ID (every replica refuses it within seconds)")
    revoke.add_argument("key_id", type=int, metavar="ID")
    sub.add_parser("migrate", parents=[common], help="apply database migrations")
    sub.add_parser("check", parents=[common], help="check config and database connectivity")
    health = sub.add_parser("health", parents=[common],
                            help="exit 0 if this host's `etlsvc serve` answers /health with 200 "
                                 "(the container's HEALTHCHECK)")
    health.add_argument("--port", type=int, default=None,
                        help="port (default: [server] port, or $ETLSVC_PORT)")
    health.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``etlsvc`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "logs":          # reads a log stream: needs no config
        try:
            return logtail.run_cli(args.file, args.follow,
                                logtail.LogFilter(args.level, args.run_id, args.source))
        except OSError as exc:
            print(f"etlsvc: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            return EXIT_OK
    try:
        cfg = load_config(config_path(getattr(args, "config", None)))
        configure_logging(cfg.log.level, cfg.log.format)
        return asyncio.run(_COMMANDS[args.command](cfg, args))
    except ConfigError as exc:
        print(f"etlsvc: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EtlError as exc:
        print(f"etlsvc: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("etlsvc: interrupted", file=sys.stderr)
        return 130


async def _run(cfg: Config, args: argparse.Namespace) -> int:
    selected = [cfg.source(n) for n in args.sources] if args.sources else list(cfg.sources)
    if not selected:
        raise ConfigError("no sources configured")
    show_bar = not args.no_progress and sys.stderr.isatty()
    workers = from_config(cfg.pipeline)
    slots = asyncio.Semaphore(cfg.pipeline.parallel_runs)

    async def run_one(position: int, src: Source) -> dict[str, Any]:
        async with slots:
            bar = _ProgressBar(src.name, position) if show_bar else None
            try:
                return await pipeline.run_source(
                    database, cfg, src, workers, trigger="manual",
                    full_refresh=args.full_refresh, on_progress=bar.update if bar else None)
            except SourceBusy as exc:
                structlog.get_logger().error("source busy", source=src.name, run_id=exc.run_id)
                return {"id": exc.run_id, "source": src.name, "status": "busy",
                        "error": str(exc)}
            finally:
                if bar:
                    bar.close()

    async with db.open_database(cfg) as database, contextlib.aclosing(workers):
        # What an earlier process left undelivered goes out with this run's notifications.
        await notify.resend_undelivered(database.pool, cfg.notify)
        # Sources at once, up to [pipeline] parallel_runs, each on its own connections.
        results = await asyncio.gather(*(run_one(i, s) for i, s in enumerate(selected)))
        await notify.drain(database.pool)   # a failure is announced before the process ends
        try:
            totals = await database.pool.fetch(
                "SELECT source, count(*) AS n FROM normalized_data WHERE source = ANY($1::text[])"
                " GROUP BY source", [s.name for s in selected], timeout=10)
        except db.UNAVAILABLE:          # the summary goes without table sizes
            totals = []
    _print_summary(results, {r["source"]: r["n"] for r in totals})
    return EXIT_OK if all(r["status"] == "succeeded" for r in results) else EXIT_FAILED


async def _backfill(cfg: Config, args: argparse.Namespace) -> int:
    if args.cancel is not None or args.list:
        async with db.open_database(cfg) as database:
            if args.cancel is not None:
                row = await backfill.cancel(database.pool, args.cancel)
                print(f"backfill {row['id']} of {row['source']}: " + (
                    "cancelled" if row["status"] == "cancelled" else
                    "cancel asked; it stops within a second"), file=sys.stderr)
                return EXIT_OK
            rows = await backfill.listing(database.pool, args.source)
        for row in rows:
            print(_backfill_line(row))
        return EXIT_OK
    if args.source is None:
        raise ConfigError("etlsvc backfill: name the SOURCE (or --list, --cancel ID)")
    src = cfg.source(args.source)
    workers = from_config(cfg.pipeline)
    bar = _ProgressBar(f"{src.name} backfill", 0) if (
        not args.no_progress and sys.stderr.isatty()) else None
    async with db.open_database(cfg) as database, contextlib.aclosing(workers):
        made = await backfill.create(database.pool, src, stream=args.table, start=args.start,
                                     end=args.end)
        if made["runs"]:
            print(f"backfill {made['id']} of {src.name} ({made['range']}) goes on where it "
                  "stopped", file=sys.stderr)
        try:
            row = await backfill.run(database, cfg, src, made["id"], workers,
                                     bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        await notify.drain(database.pool)
    print(_backfill_line(row), file=sys.stderr)
    if row.get("error"):
        print(_naming(src.name, row["error"]), file=sys.stderr)
    return EXIT_OK if row["status"] == "succeeded" else EXIT_FAILED


def _backfill_line(row: dict[str, Any]) -> str:
    """One backfill in a line: id, source, range, status and counts."""
    p = row["progress"] or {}
    counts = ", ".join(f"{p[k]:,} {k.removeprefix('rows_')}" for k in (
        "rows_read", "rows_inserted", "rows_updated", "rows_unchanged", "rows_rejected")
        if k in p)
    done = f", {p['fraction']:.0%} done" if p.get("fraction") is not None and \
        row["status"] != "succeeded" else ""
    return (f"backfill {row['id']} of {row['source']} ({row['range']}): {row['status']}"
            f"{': ' + counts if counts else ''}{done}")


async def _replay(cfg: Config, args: argparse.Namespace) -> int:
    src = cfg.source(args.source)
    async with db.open_database(cfg) as database:
        row = await replay.replay_source(database, src)
    _print_summary([row], {})
    return EXIT_OK if row["status"] == "succeeded" else EXIT_FAILED


async def _rollback(cfg: Config, args: argparse.Namespace) -> int:
    src = cfg.source(args.source)
    async with db.open_database(cfg) as database:
        done = await rollback.rollback(database, src, args.to_run,
                                       keep_position=args.keep_position, dry_run=args.dry_run)
    if args.dry_run:
        print(f"{src.name}: a rollback to run {args.to_run} would delete {done['deleted']:,} "
              f"row(s), update {done['updated']:,} and insert {done['inserted']:,} again; "
              "nothing was changed (dry run)", file=sys.stderr)
        return EXIT_OK
    row = done["run"]
    if row["status"] != "succeeded":
        print(f"{src.name}: rollback run {row['id']} failed: {row['error']}", file=sys.stderr)
        return EXIT_FAILED
    where = ("checkpoints kept" if args.keep_position else
             f"{done['checkpoints']:,} checkpoint(s) moved back: the next run reads again "
             "what was rolled back")
    print(f"{src.name}: rolled back to run {args.to_run} as run {row['id']}: "
          f"{done['deleted']:,} row(s) deleted, {done['updated']:,} updated, "
          f"{done['inserted']:,} inserted again; {where}", file=sys.stderr)
    return EXIT_OK


async def _rejects(cfg: Config, args: argparse.Namespace) -> int:
    src = cfg.source(args.source)
    async with db.open_database(cfg) as database:
        if args.action == "ignore":
            count = await retry.ignore(database, src, run_id=args.run, ids=args.ids)
            print(f"{src.name}: {count:,} open reject(s) marked ignored", file=sys.stderr)
            return EXIT_OK
        row = await retry.retry(database, src, run_id=args.run, ids=args.ids)
    print(f"{src.name}: retry run {row['id']}: {row['rows_read']:,} open reject(s) retried, "
          f"{row['rows_valid']:,} loaded (resolved), {row['rows_rejected']:,} still open",
          file=sys.stderr)
    if row.get("error"):
        print(_naming(src.name, row["error"]), file=sys.stderr)
    return EXIT_OK if row["status"] == "succeeded" else EXIT_FAILED


async def _cdc(cfg: Config, args: argparse.Namespace) -> int:
    src = cfg.source(args.source)
    kinds = (pg_cdc.PgCdcSource,) if args.action == "drop-slot" else (
        pg_cdc.PgCdcSource, mysql_cdc.MysqlCdcSource)
    if not isinstance(src, kinds):
        raise ConfigError(f"source {src.name!r} is of kind {src.kind}, not a change source "
                          f"({', '.join(k.kind for k in kinds)})")
    what = next_run = ""
    async with db.open_database(cfg) as database, database.pool.acquire() as conn, \
            runs.source_lock(conn, src.name):
        # Under the source's lock: no run of it reads the log meanwhile.
        if isinstance(src, pg_cdc.PgCdcSource):
            dropped = await pg_cdc.drop_slot(src)
            what = f"replication slot {src.slot_name} " \
                   f"{'dropped' if dropped else 'was not there'}; "
            next_run = "makes a new slot and "
        forgotten = await checkpoint.forget(conn, src.name)
    print(f"{src.name}: {what}{forgotten} checkpoint(s) forgotten: the next run "
          f"{next_run}snapshots the tables again", file=sys.stderr)
    return EXIT_OK


async def _purge(cfg: Config, args: argparse.Namespace) -> int:
    sources = [cfg.source(n) for n in args.sources] if args.sources else None
    if sources and (none := [s.name for s in sources
                             if s.retention_days is None and not s.history_days]):
        raise ConfigError(f"source {none[0]!r} has neither retention_days nor history_days: "
                          "nothing to purge")
    async with db.open_database(cfg) as database:
        done = await retention.purge(database.pool, cfg, sources)
    for name, counts in done.items():
        what = []
        if "raw" in counts:
            what.append(f"{counts['raw']:,} raw row(s) and {counts['rejects']:,} reject(s)"
                        + (" (raw rows postponed: a replay is under way)"
                           if counts["postponed"] else ""))
        if "versions" in counts:
            what.append(f"{counts['versions']:,} replaced version(s)")
        print(f"{name}: {'; '.join(what)} purged", file=sys.stderr)
    if not done:
        print("nothing purged (no source has retention_days or history_days, or another "
              "process is purging)", file=sys.stderr)
    return EXIT_OK


async def _migrate(cfg: Config, args: argparse.Namespace) -> int:
    async with db.open_database(cfg, migrate=False) as database:
        applied = await db.apply_migrations(database.pool)
    print(f"applied: {', '.join(applied)}" if applied else "database is up to date",
          file=sys.stderr)
    return EXIT_OK


async def _check(cfg: Config, args: argparse.Namespace) -> int:
    problems = 0

    def report(ok: bool, what: str) -> None:
        nonlocal problems
        problems += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}", file=sys.stderr)

    report(True, f"config: {len(cfg.sources)} source(s): "
                 f"{', '.join(s.name for s in cfg.sources) or 'none'}")
    async with db.open_database(cfg, migrate=False) as database:
        version = await database.pool.fetchval(db.query("session", "server_version"))
        where = "embedded" if database.embedded else "configured URL"
        report(True, f"database: PostgreSQL {version} ({where})")
        done = {r["version"] for r in await database.pool.fetch(
            "SELECT version FROM etl_schema_migrations")} if await database.pool.fetchval(
            "SELECT to_regclass('etl_schema_migrations') IS NOT NULL") else set()
        pending = [name for v, name, _ in db.migration_files() if v not in done]
        report(True, f"migrations: {len(pending)} pending" + (
            f" ({', '.join(pending)}; applied by `etlsvc migrate` or at start)"
            if pending else ""))
    for src in cfg.sources:
        try:
            report(True, f"source {src.name}: {await pipeline.check_source(cfg, src)}")
        except EtlError as exc:
            report(False, str(exc))
    return EXIT_OK if not problems else EXIT_FAILED


async def _serve(cfg: Config, args: argparse.Namespace) -> int:
    # Here, not at the top: litestar and the HTTP app cost every other command (run, check,
    # logs, the image's HEALTHCHECK) about a quarter of a second that only serve needs.
    from etlsvc.api.app import create_app

    # With it: the HTTP side of serve only.
    from etlsvc.api.protocol import with_header_timeout

    startup_errors: list[EtlError] = []
    config = uvicorn.Config(
        create_app(cfg, startup_errors), host=args.host or cfg.server.host,
        port=args.port or cfg.server.port,
        http=with_header_timeout(cfg.server.request_header_timeout_s),
        log_config=None, access_log=False, lifespan="on", server_header=False,
        timeout_graceful_shutdown=int(cfg.server.shutdown_grace_s) + 5)
    server = _Server(config)
    # The cyclic collector, tuned for a server: what startup made (modules, the app, the
    # config) is frozen out of every collection, and the youngest generation is collected
    # after 50,000 allocations, not 700. A page of 1,000 record versions allocates tens of
    # thousands of objects: building and encoding such pages in a loop, the default
    # thresholds made the p99 37 ms against a p50 of 1.9 ms; with no collection, 3.9 ms
    # (bench/profile_history.py, bench/RESULTS.md).
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop_gracefully)
    try:
        await server.serve()
    except SystemExit:          # uvicorn's way of saying the lifespan did not start
        if startup_errors:
            raise startup_errors[0] from None
        return EXIT_FAILED
    return EXIT_OK if server.started else EXIT_FAILED


async def _health(cfg: Config, args: argparse.Namespace) -> int:
    """GET /health of the service this config describes, on this host; 0 when it is 200."""
    host = cfg.server.host if cfg.server.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{f'[{host}]' if ':' in host else host}:{args.port or cfg.server.port}/health"
    logging.getLogger("httpx").setLevel(logging.WARNING)    # one line, not a request log
    try:
        async with httpx.AsyncClient(timeout=args.timeout) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        print(f"etlsvc: {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    status = response.json().get("data", {}).get("status") if response.headers.get(
        "content-type", "").startswith("application/json") else None
    print(f"{url}: {response.status_code} {status or ''}".rstrip())
    return EXIT_OK if response.status_code == 200 else EXIT_FAILED


async def _keys(cfg: Config, args: argparse.Namespace) -> int:
    actor = f"cli:{getpass.getuser()}"
    async with db.open_database(cfg) as database:
        pool = database.pool
        if args.action == "list":
            rows = [keys.view(r) for r in await keys.listing(pool, args.tenant)]
            print(f"{'ID':>5}  {'TENANT':<12} {'NAME':<20} {'SCOPE':<6} {'STATUS':<8} "
                  f"{'EXPIRES':<20} LAST USED")
            for k in rows:
                print(f"{k['id']:>5}  {k['tenant']:<12} {k['name']:<20} {k['scope']:<6} "
                      f"{k['status']:<8} {_when(k['expires_at']):<20} "
                      f"{_when(k['last_used_at'])}")
            return EXIT_OK
        try:
            if args.action == "create":
                expires = None if args.expires_in_days is None else (
                    dt.datetime.now(dt.UTC) + dt.timedelta(days=args.expires_in_days))
                row, secret = await keys.create(
                    pool, tenant=args.tenant, name=args.name, scope=args.scope,
                    sources=args.sources, hidden=args.hidden, expires_at=expires, actor=actor)
            elif args.action == "rotate":
                row, secret = await keys.rotate(pool, args.key_id, None, args.grace)
            else:
                row, secret = await keys.revoke(pool, args.key_id, None), None
        except AccessError as exc:
            await audit.record(pool, audit.Entry(f"key.{args.action}", actor, "failed",
                                                 details={"error": str(exc)}))
            raise
        await audit.record(pool, audit.Entry(f"key.{args.action}", actor, "ok",
                                             tenant=row["tenant"], target=f"key {row['id']}"))
    verb = {"create": "made", "rotate": "rotated", "revoke": "revoked"}[args.action]
    print(f"key {row['id']} ({row['tenant']}/{row['name']}, {row['scope']}) {verb}",
          file=sys.stderr)
    if secret:
        print("its secret, shown this once:", file=sys.stderr)
        print(secret)
    return EXIT_OK


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


_COMMANDS = {"keys": _keys, "serve": _serve, "run": _run, "replay": _replay, "rollback": _rollback,
             "rejects": _rejects, "purge": _purge, "migrate": _migrate, "check": _check,
             "health": _health, "cdc": _cdc, "backfill": _backfill}


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal handling: ours stops it and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop_gracefully(self) -> None:
        structlog.get_logger().info("stop signal received, shutting down")
        self.should_exit = True


def _naming(source: str, error: str) -> str:
    """``source: error``, unless the error names the source already (a SourceError)."""
    return error if error.startswith(f"source {source!r}: ") else f"{source}: {error}"


class _ProgressBar:
    """tqdm bar over the bytes of a run, with rows and rows/s."""

    def __init__(self, source: str, position: int = 0) -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=source, unit="B", unit_scale=True, unit_divisor=1024,
                         file=sys.stderr, dynamic_ncols=True, leave=True, position=position)

    def update(self, progress: pipeline.Progress) -> None:
        bar = self._bar
        bar.total = progress.bytes_total or None
        rows = progress.counts["rows_read"]
        elapsed = bar.format_dict["elapsed"] or 1e-9
        bar.set_postfix(rows=f"{rows:,}", rows_s=f"{rows / elapsed:,.0f}",
                        rejected=progress.counts["rows_rejected"], refresh=False)
        bar.update(progress.counts["bytes_read"] - bar.n)

    def close(self) -> None:
        self._bar.close()


def _print_summary(rows: list[dict[str, Any]], totals: dict[str, int]) -> None:
    header = ("source", "run", "status", "lines", "read", "valid", "rejected", "inserted",
              "updated", "unchanged", "rows in table")
    lines = [header]
    for r in rows:
        lines.append((r["source"], str(r.get("id") or "-"), r["status"],
                      *(f"{r.get(k, 0):,}" for k in ("lines_read", "rows_read", "rows_valid",
                                                     "rows_rejected", "rows_inserted",
                                                     "rows_updated", "rows_unchanged")),
                      f"{totals[r['source']]:,}" if r["source"] in totals else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=sys.stderr)
    for r in rows:
        if r.get("error"):
            print(_naming(r["source"], r["error"]), file=sys.stderr)
