"""Retention benchmark: the read API while 1,000,000 raw rows are purged (issue 11, point 6:
p99 ≤ 3× idle).

usage: python bench/bench_purge.py [--duration S] [--database-url URL]

Into a fresh database: `etlsvc run` of a 1,000,000-row CSV without bad rows, then the same
file again with --full-refresh (nothing changes, so the second million raw rows are
referenced by no normalized row), then every raw row is aged 30 days. `etlsvc serve`
(pinned to CPU 0, wrk to CPU 1, as bench_api.py) answers `GET /data?limit=100` and a
category page; wrk measures them, interleaved: idle, then while `etlsvc purge` deletes the
unreferenced million (the source's retention_days is 7), at 16 and 50 connections, then
idle again. Appends the p99 ratios and the purge's duration to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import wait, wrk
from bench_csv import DATA, HERE, fresh_db, machine, products_config, record, sh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    big = DATA / "purge_1000000.csv"
    if not big.exists():
        sh(sys.executable, str(HERE / "gen_csv.py"), "1000000", str(big), "--bad-rate", "0")
    db = fresh_db(args.database_url, "etlsvc_bench_purge")
    work = Path(tempfile.mkdtemp(prefix="etlsvc-bench-"))
    config = work / "config.toml"
    config.write_text(products_config(big, "retention_days = 7\n"))
    env = {**os.environ, "ETLSVC_DATABASE_URL": db}
    etlsvc = [sys.executable, "-m", "etlsvc"]
    print("loading twice, then ageing the raw rows …", flush=True)
    sh(*etlsvc, "run", "--no-progress", "--config", str(config), env=env)
    sh(*etlsvc, "run", "--no-progress", "--full-refresh", "--config", str(config), env=env)
    sh("psql", db, "-qc", "UPDATE raw_csv_data SET ingested_at = now() - interval '30 days'")
    sh("psql", db, "-qc", "VACUUM (ANALYZE) raw_csv_data, normalized_data")
    before = int(sh("psql", db, "-Atc", "SELECT count(*) FROM raw_csv_data").stdout)
    base = "http://127.0.0.1:8403"
    urls = {"first page": f"{base}/data?limit=100",
            "category": f"{base}/data?limit=100&category=Books"}
    serve = subprocess.Popen(["taskset", "-c", "0", *etlsvc, "serve", "--port", "8403",
                              "--config", str(config)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[tuple[str, str, int], dict[str, float]] = {}
    try:
        wait(f"{base}/health")
        for conns in (16, 50):
            for name, url in urls.items():
                results[("idle", name, conns)] = wrk(url, args.duration, conns)
        started = time.monotonic()
        purge = subprocess.Popen([*etlsvc, "purge", "--config", str(config)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        windows = 0
        while purge.poll() is None:
            for conns in (16, 50):
                for name, url in urls.items():
                    if purge.poll() is None:
                        key = ("purging", name, conns)
                        got = wrk(url, args.duration, conns)
                        # The worst window of each scenario counts.
                        if key not in results or got["p99"] > results[key]["p99"]:
                            results[key] = got
                        windows += 1
        purge_s = time.monotonic() - started
        _, err = purge.communicate()
        for conns in (16, 50):
            for name, url in urls.items():
                results[("idle after", name, conns)] = wrk(url, args.duration, conns)
    finally:
        serve.terminate()
        serve.wait()
    after = int(sh("psql", db, "-Atc", "SELECT count(*) FROM raw_csv_data").stdout)
    dangling = int(sh("psql", db, "-Atc", "SELECT count(*) FROM normalized_data n WHERE NOT "
                      "EXISTS (SELECT 1 FROM raw_csv_data r WHERE r.id = n.raw_id)").stdout)
    lines = []
    ratios = []
    for conns in (16, 50):
        for name in urls:
            idle = min(results[("idle", name, conns)]["p99"],
                       results[("idle after", name, conns)]["p99"])
            during = results.get(("purging", name, conns))
            if during is None:
                continue
            ratios.append(during["p99"] / idle)
            lines.append(f"| {name} | {conns} | {idle:.2f} | {during['p99']:.2f} | "
                         f"{during['p99'] / idle:.2f}× | {during['rps']:.0f} |")
    text = (f"\n### {dt.date.today()}: retention (issue 11, point 6): "
            f"`python bench/bench_purge.py --duration {args.duration}`\n\n{machine()}\n\n"
            f"`etlsvc purge` deleted {before - after:,} of {before:,} raw rows in "
            f"{purge_s:.1f} s ({err.strip()}); {dangling} normalized rows lost their raw "
            f"row; {windows} wrk windows ran during the purge (the worst p99 of each "
            "scenario is shown; idle is the better of before and after).\n\n"
            "| scenario | connections | p99 idle (ms) | p99 purging (ms) | ratio | req/s "
            "purging |\n|---|---|---|---|---|---|\n" + "\n".join(lines) +
            f"\n\n* worst p99 ratio: **{max(ratios):.2f}×** (target ≤ 3×)\n" if ratios else
            "\nthe purge ended before a wrk window did\n")
    record(text)


if __name__ == "__main__":
    main()
