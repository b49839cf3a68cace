"""Metrics: Prometheus counters of runs and requests, and recent API latencies for /stats.

Owns the process's metric objects (prometheus-client) and a bounded window of request
latencies. Each replica exposes its own; Prometheus sums them.
"""

from __future__ import annotations

import collections
import statistics
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

RUNS = Counter("etlsvc_runs_total", "Finished runs", ["source", "status"])
ROWS = Counter("etlsvc_rows_total", "Records of finished runs, by outcome", ["source", "outcome"])
RUN_SECONDS = Histogram("etlsvc_run_duration_seconds", "Duration of runs", ["source"],
                        buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600))
ANOMALIES = Counter("etlsvc_run_anomalies_total", "Finished runs flagged as anomalous, by "
                    "metric (rows_read, reject_rate, duration_s)", ["source", "metric"])
DRIFT = Counter("etlsvc_schema_drift_total", "Schema changes found in runs (new, missing or "
                "retyped columns), each once per run", ["source", "change"])
REQUESTS = Counter("etlsvc_http_requests_total", "HTTP requests", ["method", "status"])
LATENCY = Histogram("etlsvc_http_request_duration_seconds", "HTTP request latency",
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
LOOP_LAG = Histogram("etlsvc_event_loop_lag_seconds", "How late the event loop runs a timer",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
POOL_SIZE = Gauge("etlsvc_db_pool_connections", "Database pool connections", ["pool", "state"])
STREAM_LAG = Gauge("etlsvc_stream_lag_messages", "Messages of a stream source not yet "
                   "committed (not delivered, or delivered and not yet committed)", ["source"])
CDC_LAG_BYTES = Gauge("etlsvc_cdc_lag_bytes", "WAL between a change source's replication "
                      "slot's confirmed position and the source's current position",
                      ["source", "slot"])
CDC_LAG_SECONDS = Gauge("etlsvc_cdc_lag_seconds", "How old the last change applied was when "
                        "applied (0 when caught up)", ["source", "slot"])
CDC_RETAINED = Gauge("etlsvc_cdc_retained_wal_bytes", "WAL the replication slot keeps on the "
                     "source database's disk", ["source", "slot"])
CDC_MAX_RETAINED = Gauge("etlsvc_cdc_max_retained_wal_bytes", "The source's max_retained_wal",
                         ["source", "slot"])
REQUESTS_CUT = Counter("etlsvc_http_requests_cut_total", "Requests cancelled before their "
                       "answer: past the deadline (answered 503) or their client gone",
                       ["reason"])
DB_ERRORS = Counter("etlsvc_db_connection_errors_total", "Times the database could not be "
                    "reached, by what tried: request, run, scheduler, health, metrics", ["where"])
SERVED_ROWS = Counter("etlsvc_served_rows_total", "Records served by the read API, per "
                      "consumer tenant, key and dataset", ["tenant", "key", "source"])
SERVED_REQUESTS = Counter("etlsvc_served_requests_total", "Read requests that served "
                          "records of a dataset, per consumer tenant, key and dataset",
                          ["tenant", "key", "source"])
DB_UP = Gauge("etlsvc_database_up", "Whether the database answered this scrape (1) or not (0)")
LAST_SUCCESS = Gauge("etlsvc_source_last_success_timestamp_seconds",
                     "When the source's last successful run finished (Unix time)", ["source"])
STALE = Gauge("etlsvc_source_stale", "1 when a scheduled source's last success is older than "
              "three of its periods (as /health judges it)", ["source"])
FAILING = Gauge("etlsvc_source_failing", "1 when the source's last run failed or was "
                "interrupted", ["source"])
#: The last lag reading of each stream source (for /health).
stream_lag: dict[str, int] = {}
#: The last reading of each change source's slot (for /health).
cdc_slots: dict[str, dict[str, Any]] = {}

_recent: collections.deque[float] = collections.deque(maxlen=2000)


def observe_run(row: dict[str, Any], seconds: float) -> None:
    """Count a finished run (its status, its records by outcome, its duration)."""
    RUNS.labels(row["source"], row["status"]).inc()
    for outcome in ("read", "valid", "rejected", "inserted", "updated", "unchanged"):
        ROWS.labels(row["source"], outcome).inc(row[f"rows_{outcome}"])
    RUN_SECONDS.labels(row["source"]).observe(seconds)


def set_stream_lag(source: str, lag: int) -> None:
    """Record a stream source's consumer lag."""
    stream_lag[source] = lag
    STREAM_LAG.labels(source).set(lag)


def set_cdc_lag(source: str, slot: str, lag_bytes: int, lag_seconds: float,
                retained_bytes: int, max_retained_bytes: int) -> None:
    """Record a change source's slot: its lag and the WAL it retains."""
    cdc_slots[source] = {"slot": slot, "lag_bytes": lag_bytes,
                         "lag_seconds": round(lag_seconds, 3),
                         "retained_wal_bytes": retained_bytes,
                         "max_retained_wal_bytes": max_retained_bytes,
                         "over_max_retained_wal": retained_bytes > max_retained_bytes}
    CDC_LAG_BYTES.labels(source, slot).set(lag_bytes)
    CDC_LAG_SECONDS.labels(source, slot).set(lag_seconds)
    CDC_RETAINED.labels(source, slot).set(retained_bytes)
    CDC_MAX_RETAINED.labels(source, slot).set(max_retained_bytes)


def request_cut(reason: str) -> None:
    """Count a request cancelled before its answer (``deadline`` or ``client_gone``)."""
    REQUESTS_CUT.labels(reason).inc()


def database_error(where: str) -> None:
    """Count a failure to reach the database (``where``: what was trying)."""
    DB_ERRORS.labels(where).inc()


def observe_sources(states: dict[str, dict[str, Any]] | None) -> None:
    """Set the per-source gauges from /health's judgement (None: the database is away)."""
    DB_UP.set(states is not None)
    for source, state in (states or {}).items():
        if state["last_success"] is not None:
            LAST_SUCCESS.labels(source).set(state["last_success"].timestamp())
        STALE.labels(source).set(state["stale"])
        FAILING.labels(source).set(state["failing"])


#: SERVED_REQUESTS's and SERVED_ROWS's children by labels: finding them again at every
#: request costs more than counting.
_served: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def served(tenant: str, key: str, source: str, rows: int) -> None:
    if (counters := _served.get((tenant, key, source))) is None:
        counters = _served[(tenant, key, source)] = (
            SERVED_REQUESTS.labels(tenant, key, source), SERVED_ROWS.labels(tenant, key, source))
    counters[0].inc()
    counters[1].inc(rows)


def observe_request(method: str, status: int, seconds: float) -> None:
    """Count an HTTP request and keep its latency for the percentiles of /stats."""
    REQUESTS.labels(method, str(status)).inc()
    LATENCY.observe(seconds)
    _recent.append(seconds * 1000)


def latency_percentiles() -> dict[str, float | None]:
    """p50 and p99 (ms) of the recent requests of this process."""
    if len(_recent) < 2:
        return {"p50_ms": _recent[0] if _recent else None, "p99_ms": _recent[0] if _recent
                else None, "requests": len(_recent)}
    cuts = statistics.quantiles(_recent, n=100, method="inclusive")
    return {"p50_ms": round(cuts[49], 3), "p99_ms": round(cuts[98], 3),
            "requests": len(_recent)}


def exposition(pools: dict[str, Any]) -> tuple[bytes, str]:
    """The Prometheus text exposition, with the pools' sizes refreshed."""
    for name, pool in pools.items():
        size, idle = pool.get_size(), pool.get_idle_size()
        POOL_SIZE.labels(name, "busy").set(size - idle)
        POOL_SIZE.labels(name, "idle").set(idle)
    return generate_latest(), CONTENT_TYPE_LATEST
