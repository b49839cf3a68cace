"""Operating the service: ``/health`` (liveness, readiness, failing and stale sources),
``/stats``, ``/metrics`` (Prometheus, with per-source freshness read at each scrape) and
``/logs/stream`` (live log events).
"""
from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get
from litestar.params import FromQuery, QueryParameter
from litestar.response import ServerSentEvent

from etlsvc import db, flow, logtail, metrics
from etlsvc.api.http import (
    READ,
    WRITE_ERRORS,
    caller_tenant,
    envelope,
    error_responses,
    may_read,
    read_pool,
    readable_sources,
    service_of,
    tenant_sources,
)
from etlsvc.contract import DEFAULT_TENANT
from etlsvc.extract import KINDS
from etlsvc.runtime.service import stale

#: Seconds /health waits for the database.
HEALTH_DB_S = 0.8


async def source_states(request: Request, where: str) -> dict[str, dict[str, Any]]:
    """Each configured source's last load, last successful load, and whether it is stale
    (by the database's clock), failing or degraded (what /health and /metrics report); a
    reject retry or a replay is not a load. Raises when the database cannot be read (counted
    in ``etlsvc_db_connection_errors_total`` under ``where``)."""
    service = service_of(request)
    try:
        # Every tenant's sources (a function of the database's, for the read pool's role).
        last = {r["source"]: dict(r) for r in await read_pool(request).fetch(
            db.query("api", "last_runs"), timeout=5)}
    except Exception:
        metrics.database_error(where)
        raise
    # Without any run, nothing is judged by the clock.
    now = next(iter(last.values()))["now"] if last else dt.datetime.now(dt.UTC)
    sources = {}
    for src in service.cfg.sources:
        info = last.get(src.name, {})
        sources[src.name] = {"last_run": info.get("id"), "status": info.get("status"),
                             "last_success": info.get("last_success"),
                             "stale": stale(src, info.get("last_success"), now),
                             "failing": info.get("status") in ("failed", "interrupted"),
                             "error": info.get("error"),
                             # The last load was unlike the recent ones (runtime/anomalies.py).
                             "degraded": info.get("anomaly") is not None,
                             "anomaly": info.get("anomaly"),
                             # any run, a retry or a replay included
                             "running_run": info.get("running_run")}
        if KINDS[src.kind].changes:
            slot = metrics.cdc_slots.get(src.name)
            sources[src.name]["slot"] = slot
            if slot and slot["over_max_retained_wal"]:
                sources[src.name]["failing"] = True
                sources[src.name]["error"] = (
                    f"replication slot {slot['slot']} retains {slot['retained_wal_bytes']} "
                    f"bytes of WAL, over max_retained_wal ({slot['max_retained_wal_bytes']})")
        elif KINDS[src.kind].continuous:
            sources[src.name]["lag"] = metrics.stream_lag.get(src.name)
    return sources


@get("/health", summary="Liveness and readiness", responses=error_responses(429, 503))
async def health(request: Request) -> Response[dict[str, Any]]:
    """200 when the database answers, the scheduler runs and no source is stale (nor, with
    ``server.health_fails_on_failing_sources``, has a failed last run); else 503. A source
    whose last load was anomalous is listed as degraded (the answer stays 200: the data is
    odd, the service is fine)."""
    service = service_of(request)
    checks: dict[str, Any] = {"scheduler": service.scheduler_running}
    readable = await may_read(request)

    async def read() -> tuple[dict[str, dict[str, Any]], set[str]]:
        # The status is the service's, of every source; the answer names only the sources
        # the caller may read.
        states = await source_states(request, "health")
        if readable:
            return states, await readable_sources(request)
        # Without a key: the default tenant's sources, in less detail (below).
        return states, {s.name for s in tenant_sources(request)}

    # Within a second, whatever the database does: a probe must learn that it is not
    # answering, not hang with it. The reading is left to end in the background (giving
    # its connection back to the pool needs the database too).
    reading = asyncio.create_task(read())
    await asyncio.wait({reading}, timeout=HEALTH_DB_S)
    try:
        if not reading.done():
            flow.abandon(reading)
            raise TimeoutError
        every, visible = reading.result()
        sources = {n: s for n, s in every.items() if n in visible}
        checks["database"] = True
    except Exception as exc:  # any failure to reach the database is "not ready"
        checks["database"] = False
        checks["database_error"] = (f"not answering within {HEALTH_DB_S:g} s"
                                    if isinstance(exc, TimeoutError) else type(exc).__name__)
        sources = {}
        every = {}
    failing = sorted(n for n, s in sources.items() if s["failing"])
    healthy = checks["database"] and checks["scheduler"] and not any(
        s["stale"] for s in every.values()) and not (
        service.cfg.server.health_fails_on_failing_sources and any(
            s["failing"] for s in every.values()))
    body = envelope(request, {"status": "ok" if healthy else "degraded", "checks": checks,
                              "failing_sources": failing,
                              "degraded_sources": sorted(
                                  n for n, s in sources.items() if s["degraded"]),
                              "running": sorted(n for n, s in sources.items()
                                                if s["running_run"]),
                              "sources": sources})
    if not readable:
        # Anyone may ask /health (probes carry no key); with public_read off, only states:
        # errors and anomalies can name files, hosts and values.
        body["data"]["sources"] = {n: {k: s[k] for k in ("status", "stale", "failing",
                                                           "degraded")}
                                   for n, s in sources.items()}
        body["data"]["checks"].pop("database_error", None)
    response = Response(content=body, status_code=200 if healthy else 503)
    if not checks["database"]:
        response.headers["Retry-After"] = "2"
    return response


@get("/stats", summary="Per-source statistics, pool use, API latency",
     **READ)
async def stats(request: Request) -> dict[str, Any]:
    """Rows, runs, success rate, error rate, throughput and last run per source."""
    service = service_of(request)
    rows = {r["source"]: r for r in await read_pool(request).fetch(
        db.query("api", "source_stats"))}
    sources = {}
    visible = await readable_sources(request)
    for src in (s for s in service.cfg.sources if s.name in visible):
        r = rows.get(src.name)
        runs_n = r["runs"] if r else 0
        sources[src.name] = {
            "kind": src.kind, "rows": r["rows"] if r else 0, "runs": runs_n,
            "succeeded": r["succeeded"] if r else 0, "failed": r["failed"] if r else 0,
            "success_rate": round(r["succeeded"] / runs_n, 4) if runs_n else None,
            "error_rate": round(r["rows_rejected"] / r["rows_read"], 4)
            if r and r["rows_read"] else None,
            "last_rows_per_s": int(r["last_rows_per_s"]) if r and r["last_rows_per_s"]
            else None,
            "last_run_id": r["last_run_id"] if r else None,
            # The changes of the last run that found schema drift (transform/drift.py).
            "schema_drift": r["last_drift"] if r else None,
            "next_run_at": service.next_run_at(src.name)}
    pools = {"etl": service.database.pool, "read": read_pool(request)}
    return envelope(request, {
        "sources": sources,
        "pools": {name: {"size": p.get_size(), "idle": p.get_idle_size(),
                         "max": p.get_max_size()} for name, p in pools.items()},
        "api_latency": metrics.latency_percentiles(),
        "event_loop_worst_lag_ms_1min": service.loop_monitor.worst_ms(),
        "running": [dict(r) for r in await read_pool(request).fetch(
            db.query("api", "running_runs"))]})


@get("/metrics", summary="Prometheus metrics", media_type="text/plain")
async def prometheus(request: Request) -> Response[bytes]:
    """This replica's metrics, with each source's freshness read from the database (the
    metrics stay available when it is away: ``etlsvc_database_up`` is 0 then)."""
    try:
        metrics.observe_sources(await source_states(request, "metrics"))
    except Exception:
        metrics.observe_sources(None)
    body, content_type = metrics.exposition(
        {"etl": service_of(request).database.pool, "read": read_pool(request)})
    return Response(content=body, media_type=content_type)


@get("/logs/stream", summary="Live log events (server-sent events; API key required)",
     media_type="text/event-stream", responses=WRITE_ERRORS, opt={"scope": "admin"})
async def log_stream(
    request: Request,
    level: Annotated[str, QueryParameter(pattern="^(debug|info|warning|error|critical)$")]
    = "info",
    run_id: Annotated[int | None, QueryParameter(ge=0, le=db.MAX_ID)] = None,
    source: FromQuery[str | None] = None,
) -> ServerSentEvent:
    """Each matching log event of this process, from now on, as one SSE ``data:`` line.
    An admin of the default tenant (the operator's) sees every event; another tenant's
    admin only those of its own sources."""
    keep = logtail.LogFilter(level, run_id, source)
    tenant = caller_tenant()
    own = None if tenant == DEFAULT_TENANT else {s.name for s in tenant_sources(request)}

    async def events() -> AsyncIterator[str]:
        with logtail.HUB.subscribe() as queue:
            while True:
                event = await queue.get()
                if keep(event) and (own is None or event.get("source") in own):
                    yield msgspec.json.encode(event).decode()

    return ServerSentEvent(events())


HANDLERS = [health, stats, prometheus, log_stream]
