"""Read API benchmark: `etlsvc serve` against a minimal Litestar + asyncpg floor, with wrk.

usage: python bench/bench_api.py [--rows N] [--duration S] [--database-url URL]

Loads N rows (default 1,000,000, generated with bench/gen_csv.py) into a fresh database with
`etlsvc run`, then, with each server pinned to CPU 0 and wrk to CPU 1 (taskset):
first page, a deep page (cursor near the end) and a category filter of `GET /data?limit=100`
on etlsvc and on bench/floor_app.py; etlsvc's first page while a CSV run of the same file
goes on in the same process; and `If-None-Match` requests answered 304. Appends requests/s,
p50 and p99 of each, and the ratios the issue sets targets for, to bench/RESULTS.md.
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
from bench_csv import RESULTS, fresh_db, generate, machine, sh
from etlsvc.routes import encode_cursor

HERE = Path(__file__).resolve().parent
KEY = "bench-key"


def wrk(url: str, seconds: int, header: str | None = None) -> dict[str, float]:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", url]
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
    config.write_text(
        f'[server]\nrate_limit_per_minute = 0\n[log]\nformat = "json"\nlevel = "warning"\n'
        f'[[sources]]\nname = "products"\nkind = "csv"\npath = "{csv}"\n{fields}'
        f'[[sources]]\nname = "during"\nkind = "csv"\npath = "{csv}"\n{fields}')
    env = {**os.environ, "ETLSVC_DATABASE_URL": db, "ETLSVC_API_KEYS": KEY}
    print("loading …", flush=True)
    sh(sys.executable, "-m", "etlsvc", "run", "products", "--config", str(config), env=env)
    # Vacuum now: otherwise autovacuum of the fresh 1 M rows runs during the first
    # scenarios measured (etlsvc's) and not during the floor's.
    sh("psql", db, "-qc", "VACUUM (ANALYZE) normalized_data, raw_csv_data, etl_runs")
    last = int(sh("psql", db, "-Atc", "SELECT max(id) FROM normalized_data").stdout)
    deep = encode_cursor(last - 5_000, ("data", None, None, None, None, None, None))
    category = "Books"
    results: dict[str, dict[str, float]] = {}

    etl = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "etlsvc", "serve",
                            "--port", "8401", "--config", str(config)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = "http://127.0.0.1:8401"
        wait(f"{base}/health")
        results["etlsvc first page"] = wrk(f"{base}/data?limit=100", args.duration)
        results["etlsvc deep page"] = wrk(f"{base}/data?limit=100&cursor={deep}", args.duration)
        results["etlsvc category"] = wrk(f"{base}/data?limit=100&category={category}",
                                         args.duration)
        etag = httpx.get(f"{base}/data?limit=100").headers["etag"]
        results["etlsvc If-None-Match (304)"] = wrk(f"{base}/data?limit=100", args.duration,
                                                    header=f"If-None-Match: {etag}")
        r = httpx.post(f"{base}/etl/run", json={"sources": ["during"]},
                       headers={"Authorization": f"Bearer {KEY}"})
        run_id = r.json()["data"]["runs"][0]["run_id"]
        time.sleep(2)
        results["etlsvc first page during a run"] = wrk(f"{base}/data?limit=100",
                                                        args.duration)
        status = httpx.get(f"{base}/etl/runs/{run_id}").json()["data"]
        during_running = status["status"] == "running"
    finally:
        etl.terminate()
        etl.wait(timeout=120)

    floor = subprocess.Popen(["taskset", "-c", "0", sys.executable, str(HERE / "floor_app.py"),
                              "8402"], env={**os.environ, "DATABASE_URL": db},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = "http://127.0.0.1:8402"
        wait(f"{base}/data?limit=1")
        results["floor first page"] = wrk(f"{base}/data?limit=100", args.duration)
        results["floor deep page"] = wrk(f"{base}/data?limit=100&after={last - 5_000}",
                                         args.duration)
        results["floor category"] = wrk(f"{base}/data?limit=100&category={category}",
                                        args.duration)
    finally:
        floor.terminate()
        floor.wait(timeout=60)

    rows = "\n".join(f"| {name} | {r['rps']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['errors']:,} / {r['requests']:,} |" for name, r in results.items())
    ratios = {
        "first page vs floor": results["etlsvc first page"]["rps"]
        / results["floor first page"]["rps"],
        "deep page vs floor": results["etlsvc deep page"]["rps"]
        / results["floor deep page"]["rps"],
        "category vs floor": results["etlsvc category"]["rps"]
        / results["floor category"]["rps"],
        "deep vs first page (etlsvc)": results["etlsvc deep page"]["rps"]
        / results["etlsvc first page"]["rps"],
        "p99 during a run vs idle": results["etlsvc first page during a run"]["p99"]
        / results["etlsvc first page"]["p99"],
    }
    lines = "\n".join(f"* {k}: **{v:.2f}×**" for k, v in ratios.items())
    text = (f"\n### {dt.date.today()}: `python bench/bench_api.py --rows {args.rows} "
            f"--duration {args.duration}`\n\n{machine()}; servers pinned to CPU 0, wrk "
            f"(1 thread, 16 connections) to CPU 1. The run was still going during its "
            f"scenario: {during_running}.\n\n"
            "| scenario | requests/s | p50 ms | p99 ms | non-2xx/3xx / requests |\n"
            f"|---|---|---|---|---|\n{rows}\n\n{lines}\n")
    print(text)
    with open(RESULTS, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
