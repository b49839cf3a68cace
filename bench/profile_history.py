"""Where a 1,000-version history page spends its time, in one process: the fetch, and
building and encoding the answer, 500 times, with the garbage collector as configured
(default thresholds), off (``--no-gc``), or as ``etlsvc serve`` sets it (``--serve-gc``).

usage: python bench/profile_history.py DATABASE_URL [--row ID] [--no-gc | --serve-gc]

DATABASE_URL is a database that `bench/bench_versions.py` left (a row of 1,000 versions).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time

import asyncpg

from etlsvc import db
from etlsvc.api.data import _DATA_COLUMNS, DataRow, Lineage, Version
from etlsvc.api.http import encode_json


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--row", type=int, default=1)
    ap.add_argument("--no-gc", action="store_true")
    ap.add_argument("--serve-gc", action="store_true",
                    help="the collector as `etlsvc serve` sets it")
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})
    if args.no_gc:
        gc.disable()
    if args.serve_gc:
        gc.freeze()
        gc.set_threshold(50_000, 20, 10)
    pool = await asyncpg.create_pool(args.url, init=db.init_connection)
    query = db.query("versions", "history")
    fetch, build = [], []
    for _ in range(500):
        start = time.perf_counter()
        rows = await pool.fetch(query, args.row, None, 1001)
        fetched = time.perf_counter()
        encode_json([Version(DataRow(*r[:_DATA_COLUMNS]), r["valid_from"], r["valid_to"],
                             str(r["from_xid"]), None, None,
                             Lineage(r["run_id"], "", r["raw_table"], r["raw_id"]))
                     for r in rows])
        fetch.append((fetched - start) * 1000)
        build.append((time.perf_counter() - fetched) * 1000)
    for name, took in (("fetch", fetch), ("build and encode", build)):
        took.sort()
        print(f"{name}: p50 {took[250]:.1f} ms, p99 {took[495]:.1f} ms, max {took[-1]:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
