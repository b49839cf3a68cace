"""Read API benchmark: `etlsvc serve` against a minimal Litestar + asyncpg floor, with wrk.

usage: python bench/bench_api.py [--rows N] [--duration S] [--database-url URL]

Loads N rows (default 1,000,000, generated with bench/gen_csv.py) and a second source of
2,000 into a fresh database with `etlsvc run`, then, with both servers pinned to CPU 0 and
wrk to CPU 1 (taskset), at 16 and at 50 connections, scenario by scenario on etlsvc and on
bench/floor_app.py in turn: the first page, a deep page (cursor near the end) and a category
filter of `GET /data?limit=100`; on etlsvc also the small source's page and an
updated_since page; `If-None-Match` answered 304 against the floor's constant response; and
etlsvc's first page while a CSV run goes on in the same process. Appends requests/s, p50
and p99 of each, and the ratios issue #9 sets targets for, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_csv import fresh_db, generate, machine, record, sh
from etlsvc.api.http import encode_cursor

HERE = Path(__file__).resolve().parent
KEY = "bench-key"


def wrk(url: str, seconds: int, connections: int, header: str | None = None) -> dict[str, float]:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
           url]
    if header:
        cmd[6:6] = ["-H", header]
    out = sh(*cmd).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))

    def ms(p: str) -> float:
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "requests": total,
            "errors": int(non2xx.group(1)) if non2xx else 0}


def wait(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    csv = generate(args.rows)
    small = generate(2_000)
    db = fresh_db(args.database_url, "etlsvc_bench_api")
    work = Path(tempfile.mkdtemp(prefix="etlsvc-bench-"))
    config = work / "config.toml"
    fields = textwrap.dedent("""\
        [sources.fields]
        source_id = "id"
        title = "title"
        category = "category"
        amount = "amount"
        event_time = "created_at"
        """)
    # Every feature on: the rate limiter with a limit wrk never reaches, logs, request ids.
    config.write_text(
        f'[server]\nrate_limit_per_minute = 100000000\n[log]\nformat = "json"\n'
        f'level = "warning"\n'
        f'[[sources]]\nname = "products"\nkind = "csv"\npath = "{csv}"\n{fields}'
        f'[[sources]]\nname = "small"\nkind = "csv"\npath = "{small}"\n{fields}'
        f'[[sources]]\nname = "during"\nkind = "csv"\npath = "{csv}"\n{fields}')
    env = {**os.environ, "ETLSVC_DATABASE_URL": db, "ETLSVC_API_KEYS": KEY}
    print("loading …", flush=True)
    sh(sys.executable, "-m", "etlsvc", "run", "products", "--config", str(config), env=env)
    sh(sys.executable, "-m", "etlsvc", "run", "small", "--config", str(config), env=env)
    # Vacuum now: otherwise autovacuum of the fresh 1 M rows runs during the first
    # scenarios measured.
    sh("psql", db, "-qc", "VACUUM (ANALYZE) normalized_data, raw_csv_data, etl_runs")
    last = int(sh("psql", db, "-Atc", "SELECT max(id) FROM normalized_data").stdout)
    # "A recent time": the small source's load, the last 2,000 rows written.
    since = sh("psql", db, "-Atc", "SELECT to_char(max(updated_at), "
               "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM normalized_data").stdout.strip()
    deep = encode_cursor(last - 5_000, ("data", None, None, None, None, None, None))
    e, f = "http://127.0.0.1:8401", "http://127.0.0.1:8402"
    # (scenario, etlsvc URL, floor URL or None)
    scenarios = [
        ("first page", f"{e}/data?limit=100", f"{f}/data?limit=100"),
        ("deep page", f"{e}/data?limit=100&cursor={deep}",
         f"{f}/data?limit=100&after={last - 5_000}"),
        ("category", f"{e}/data?limit=100&category=Books", f"{f}/data?limit=100&category=Books"),
        ("small source", f"{e}/data?limit=100&source=small", None),
        ("updated_since", f"{e}/data?limit=100&updated_since={since}", None),
    ]
    results: dict[tuple[str, int], dict[str, float]] = {}
    etl = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "etlsvc", "serve",
                            "--port", "8401", "--config", str(config)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    floor = subprocess.Popen(["taskset", "-c", "0", sys.executable, str(HERE / "floor_app.py"),
                              "8402"], env={**os.environ, "DATABASE_URL": db},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait(f"{e}/health")
        wait(f"{f}/static")
        etag = httpx.get(f"{e}/data?limit=100").headers["etag"]
        for conns in (16, 50):
            for name, mine, theirs in scenarios:      # interleaved: etlsvc, then the floor
                results[(f"etlsvc {name}", conns)] = wrk(mine, args.duration, conns)
                if theirs:
                    results[(f"floor {name}", conns)] = wrk(theirs, args.duration, conns)
            results[("etlsvc If-None-Match (304)", conns)] = wrk(
                f"{e}/data?limit=100", args.duration, conns, header=f"If-None-Match: {etag}")
            results[("floor static response", conns)] = wrk(f"{f}/static", args.duration,
                                                             conns)
        r = httpx.post(f"{e}/etl/run", json={"sources": ["during"]},
                       headers={"Authorization": f"Bearer {KEY}"})
        run_id = r.json()["data"]["runs"][0]["run_id"]
        time.sleep(2)
        for conns in (16, 50):
            results[("etlsvc first page during a run", conns)] = wrk(
                f"{e}/data?limit=100", args.duration, conns)
        during_running = httpx.get(f"{e}/etl/runs/{run_id}").json()["data"]["status"] == (
            "running")
    finally:
        for proc in (etl, floor):
            proc.terminate()
            proc.wait(timeout=120)

    rows = "\n".join(f"| {name} | {conns} | {r['rps']:,.0f} | {r['p50']:.1f} | "
                     f"{r['p99']:.1f} | {r['errors']:,} / {r['requests']:,} |"
                     for (name, conns), r in results.items())

    # The targets: (label, numerator, denominator, what is compared)
    targets = [
        ("first page vs floor (≥ 0.8)", "etlsvc first page", "floor first page", "rps"),
        ("deep page vs floor (≥ 0.8)", "etlsvc deep page", "floor deep page", "rps"),
        ("category vs floor (≥ 0.8)", "etlsvc category", "floor category", "rps"),
        ("deep vs first page (≥ 0.8)", "etlsvc deep page", "etlsvc first page", "rps"),
        ("small source vs first page (≥ 0.5)", "etlsvc small source", "etlsvc first page",
         "rps"),
        ("updated_since vs first page (≥ 0.5)", "etlsvc updated_since", "etlsvc first page",
         "rps"),
        ("p99 during a run vs idle (≤ 3)", "etlsvc first page during a run",
         "etlsvc first page", "p99"),
        ("If-None-Match vs static (≥ 0.5)", "etlsvc If-None-Match (304)",
         "floor static response", "rps"),
    ]
    lines = [f"* {conns} connections, {label}: "
             f"**{results[(top, conns)][key] / results[(bottom, conns)][key]:.2f}×**"
             for conns in (16, 50) for label, top, bottom, key in targets]
    text = (f"\n### {dt.date.today()}: `python bench/bench_api.py --rows {args.rows} "
            f"--duration {args.duration}`\n\n{machine()}; both servers pinned to CPU 0 and "
            "measured in turn (etlsvc, then the floor, scenario by scenario), wrk (1 thread) on "
            "CPU 1; etlsvc with every feature on (rate limiter with a limit never reached). "
            f"The run was still going during its scenario: {during_running}.\n\n"
            "| scenario | connections | requests/s | p50 ms | p99 ms | "
            "non-2xx/3xx / requests |\n"
            f"|---|---|---|---|---|---|\n{rows}\n\n" + "\n".join(lines) + "\n")
    record(text)


if __name__ == "__main__":
    main()
