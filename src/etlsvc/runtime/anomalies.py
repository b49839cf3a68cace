"""Anomalies: a finished run compared with the source's recent successful runs.

Owns the score. For each of rows read, reject rate and duration, the run's value is set
against the last ``window`` successful runs of the source that read something, with a robust
z-score: ``0.6745 × (value − median) / MAD`` (MAD: the median absolute deviation), which one
wild run in the history does not drag. A run is anomalous when a score passes the source's
``threshold`` — rows read in either direction, rejects and duration only upwards. The MAD
has a floor per metric, so that a history of identical runs does not make every small wobble
infinite: 5 % of the median rows (at least 1 row), one percentage point of reject rate, 10 %
of the median duration (at least half a second).

Runs that read nothing are left out (an unchanged file is not news; a source that stops
delivering is caught as stale), and so are retries and replays.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import asyncpg

from etlsvc import db
from etlsvc.contract import AnomalyConfig

#: Scales the MAD to a standard deviation for normally distributed values.
_K = 0.6745


#: metric: (value of a run, floor of the MAD given the median, the direction that counts).
_METRICS: dict[str, tuple[Callable[[Any], float], Callable[[float], float], int]] = {
    "rows_read": (lambda r: float(r["rows_read"]), lambda m: max(0.05 * m, 1.0), 0),
    "reject_rate": (lambda r: r["rows_rejected"] / r["rows_read"], lambda m: 0.01, 1),
    "duration_s": (lambda r: float(r["seconds"]), lambda m: max(0.1 * m, 0.5), 1),
}


def score(run: Any, history: list[Any], threshold: float) -> dict[str, Any] | None:
    """The metrics of ``run`` that are anomalous against ``history`` ({metric: {value,
    median, mad, score}}), or None."""
    found = {}
    for name, (value_of, floor, direction) in _METRICS.items():
        values = [value_of(r) for r in history]
        median = statistics.median(values)
        mad = statistics.median(abs(v - median) for v in values)
        value = value_of(run)
        z = _K * (value - median) / max(mad, floor(abs(median)))
        if abs(z) > threshold and (direction == 0 or z * direction > 0):
            found[name] = {"value": round(value, 4), "median": round(median, 4),
                           "mad": round(mad, 4), "score": round(z, 2)}
    return found or None


async def check(conn: asyncpg.Connection, cfg: AnomalyConfig, run: dict[str, Any]
                ) -> dict[str, Any] | None:
    """Judge a finished successful run; flag it in ``etl_runs`` and return the anomaly, or
    None (nothing anomalous, too little history, or nothing read)."""
    if not cfg.enabled or run["status"] != "succeeded" or not run["rows_read"] or \
            run.get("trigger") not in ("manual", "schedule", "startup", "stream"):
        return None
    history = await conn.fetch(db.query("runs", "history"), run["source"], run["id"],
                               cfg.window)
    if len(history) < cfg.min_runs:
        return None
    seconds = (run["finished_at"] - run["started_at"]).total_seconds()
    anomaly = score({**run, "seconds": seconds}, history, cfg.threshold)
    if anomaly:
        await conn.execute(db.query("runs", "flag_anomaly"), run["id"], anomaly)
    return anomaly
