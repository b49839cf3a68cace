"""What data versioning costs (issue #24): this tree against the commit before it, interleaved.

usage: python bench/bench_versions.py [--against REV] [--rows N] [--rounds R] [--duration S]
       python bench/bench_versions.py --history-only DB_URL [--row ID]

REV (default b192a31, the last commit before versioning) is checked out in a temporary
worktree. Each round, for this tree and for REV in turn, on a fresh database:

* the N-row CSV (default 1,000,000, bench/gen_csv.py) loaded into the empty table, timed;
* the same file with 10 % of its rows changed (every tenth row's title), loaded again,
  timed; then the sizes of normalized_data and of the version tables.

Then, on this tree's last database, with the server pinned to CPU 0 and wrk to CPU 1, at 16
and 50 connections, interleaved with REV's server on its own last database: REV's
`GET /data?limit=100` (today's first page), this tree's, and this tree's as of a snapshot
(before the reload) and as of a time (resolved once; its pages name the snapshot). Last,
`GET /data/{id}/history` of a row updated 1,000 times by SQL, a page of 100 versions and
one of all 1,000: 500 requests each by httpx, one after another, then 10 s each of wrk with
one connection; p50 and p99.

Ratios (this tree / REV) and the figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import wait, wrk
from bench_csv import fresh_db, generate, machine, products_config, record, sh

HERE = Path(__file__).resolve().parent


def changed_copy(path: Path) -> Path:
    """The file with every tenth row's title changed (the CSV writer quotes every field)."""
    out = path.with_name(path.stem + "_10pct.csv")
    if not out.exists():
        import csv
        with path.open(newline="") as f, out.open("w", newline="") as g:
            rows, writer = csv.reader(f), csv.writer(g)
            writer.writerow(next(rows))
            for i, row in enumerate(rows):
                if i % 10 == 0:
                    row[1] = row[1] + " (changed)"
                writer.writerow(row)
    return out


def load(src: Path | None, url: str, name: str, first: Path, second: Path,
         work: Path) -> dict[str, float | int | str]:
    """Both loads by the etlsvc of ``src`` (None: this tree) into a fresh database."""
    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
    db = fresh_db(url, name)
    config = work / f"{name}.toml"

    def write(path: Path) -> None:
        config.write_text(products_config(path, "batch_size = 10000\n"))

    write(first)
    sh(sys.executable, "-m", "etlsvc", "migrate", "--config", str(config),
       env={**env, "ETLSVC_DATABASE_URL": db})
    out: dict[str, float | int | str] = {"db": db, "config": str(config)}
    for label, path in (("initial", first), ("reload", second)):
        write(path)
        start = time.perf_counter()
        sh(sys.executable, "-m", "etlsvc", "run", "--config", str(config),
           env={**env, "ETLSVC_DATABASE_URL": db})
        out[label] = time.perf_counter() - start
        if label == "initial":
            out["snapshot"] = sh("psql", db, "-Atc",
                                 "SELECT pg_current_snapshot()::text").stdout.strip()
            out["time"] = sh("psql", db, "-Atc", "SELECT to_char(clock_timestamp(), "
                             "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')").stdout.strip()
    sizes = sh("psql", db, "-Atc", """
        SELECT string_agg(format('%s %s', c.relname,
                                 pg_total_relation_size(c.oid)), ',' ORDER BY c.relname)
        FROM pg_class c WHERE c.relname IN ('normalized_data', 'data_history', 'data_commits')
    """).stdout.strip()
    for item in sizes.split(","):
        table, size = item.split()
        out[table] = int(size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="b192a31")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--history-only", metavar="DB",
                    help="only the history requests, on the database of an earlier run")
    ap.add_argument("--row", type=int, default=1, help="with --history-only: its row")
    args = ap.parse_args()
    if args.history_only:
        history_only(args.history_only, args.row)
        return
    first = generate(args.rows)
    second = changed_copy(first)
    work = Path(tempfile.mkdtemp(prefix="etlsvc-bench-versions-"))
    tree = work / "tree"
    sh("git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), args.against)
    try:
        run(args, first, second, work, tree / "src")
    finally:
        sh("git", "-C", str(HERE), "worktree", "remove", "--force", str(tree))


def run(args: argparse.Namespace, first: Path, second: Path, work: Path, base: Path) -> None:
    loads: dict[str, list[dict]] = {"this tree": [], args.against: []}
    for r in range(args.rounds):
        for label, src in (("this tree", None), (args.against, base)):
            done = load(src, args.database_url, f"etlsvc_bench_v_{'new' if src is None else 'old'}",
                        first, second, work)
            loads[label].append(done)
            print(r, label, {k: v for k, v in done.items() if k not in ("db", "config")},
                  flush=True)
    new, old = loads["this tree"][-1], loads[args.against][-1]

    def median(label: str, key: str) -> float:
        return statistics.median(float(d[key]) for d in loads[label])

    lines = [f"| {what} | {median('this tree', key):.1f} s | {median(args.against, key):.1f} s "
             f"| **{median('this tree', key) / median(args.against, key):.2f}×** |"
             for what, key in (("load into the empty table", "initial"),
                               ("reload, 10 % of rows changed", "reload"))]
    sizes = [f"| {t} | {int(new.get(t, 0)) / 2**20:,.0f} MiB | "
             f"{int(old.get(t, 0)) / 2**20:,.0f} MiB |"
             for t in ("normalized_data", "data_history", "data_commits")]

    # The read side: both servers up, each on its own last database.
    e, o = "http://127.0.0.1:8411", "http://127.0.0.1:8412"
    servers = []
    for port, src, done in ((8411, None, new), (8412, base, old)):
        env = {**os.environ, "ETLSVC_DATABASE_URL": str(done["db"]),
               **({"PYTHONPATH": str(src)} if src else {})}
        servers.append(subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "etlsvc", "serve", "--port",
             str(port), "--config", str(done["config"])], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        wait(f"{e}/health")
        wait(f"{o}/health")
        sh("psql", str(new["db"]), "-qc", "VACUUM (ANALYZE)")
        sh("psql", str(old["db"]), "-qc", "VACUUM (ANALYZE)")
        # A time resolves to a snapshot once; its pages then name the snapshot.
        resolved = httpx.get(f"{e}/data", params={"limit": 1, "as_of": new["time"]}).json()[
            "metadata"]["pagination"]["as_of"]
        scenarios = [
            (f"{args.against} /data", f"{o}/data?limit=100"),
            ("this tree /data", f"{e}/data?limit=100"),
            ("this tree /data as_of snapshot", f"{e}/data?limit=100&as_of={new['snapshot']}"),
            ("this tree /data as_of time", f"{e}/data?limit=100&as_of={resolved}"),
        ]
        for rnd in range(2):
            for conns in (16, 50):
                for name, url in scenarios:
                    got = wrk(url, args.duration, conns)
                    assert got["errors"] == 0, (name, got)
                    results.setdefault((name, conns), []).append(got)
                    print(rnd, conns, name, got, flush=True)
        # A row with 1,000 versions.
        db = str(new["db"])
        row = int(sh("psql", db, "-Atc", "SELECT min(id) FROM normalized_data").stdout)
        sh("psql", db, "-qc", f"""
            DO $$ BEGIN FOR i IN 1..1000 LOOP
                UPDATE normalized_data SET title = 'v' || i WHERE id = {row};
                COMMIT;
            END LOOP; END $$""")
        history = measure_history(e, row)
    finally:
        for s in servers:
            s.terminate()
            s.wait()

    def rps(name: str, conns: int) -> float:
        return statistics.median(r["rps"] for r in results[(name, conns)])

    def p99(name: str, conns: int) -> float:
        return statistics.median(r["p99"] for r in results[(name, conns)])

    base_name = f"{args.against} /data"
    reads = [f"| {name} | {conns} | {rps(name, conns):,.0f} | {p99(name, conns):.1f} ms | "
             f"**{rps(name, conns) / rps(base_name, conns):.2f}×** |"
             for conns in (16, 50) for name, _ in scenarios]
    head = sh("git", "rev-parse", "--short", "HEAD").stdout.strip()
    record(f"\n### {dt.date.today()}: `python bench/bench_versions.py --rows {args.rows} "
           f"--rounds {args.rounds} --against {args.against}` (this tree: `{head}`)\n\n"
           f"{machine()}\n\nLoads (median of {args.rounds} rounds, interleaved):\n\n"
           f"| load | this tree | {args.against} | ratio |\n|---|---|---|---|\n"
           + "\n".join(lines) +
           f"\n\nSizes after the reload:\n\n| table | this tree | {args.against} |\n"
           "|---|---|---|\n" + "\n".join(sizes) +
           "\n\nReads, `limit=100`, first page (wrk, median of 2 interleaved rounds of "
           f"{args.duration} s; server on CPU 0, wrk on CPU 1):\n\n"
           f"| request | connections | requests/s | p99 | vs {args.against} /data |\n"
           "|---|---|---|---|---|\n" + "\n".join(reads) +
           "\n\n" + history_line(history))


def measure_history(base: str, row: int) -> dict[int, tuple[float, float]]:
    """p50 and p99 (ms) of the row's history in pages of 100 and of 1,000, one request
    after another: 500 by httpx (a Python client's own time included), then 10 s of wrk
    with one connection (a C client: the endpoint's time and the transfer)."""
    history = {}
    with httpx.Client() as client:
        for limit in (100, 1000):
            url = f"{base}/data/{row}/history?limit={limit}"
            assert len(client.get(url).json()["data"]) == limit
            took = []
            for _ in range(500):
                start = time.perf_counter()
                client.get(url).raise_for_status()
                took.append((time.perf_counter() - start) * 1000)
            took.sort()
            history[limit] = (took[len(took) // 2], took[int(len(took) * 0.99)])
    for limit in (100, 1000):
        got = wrk(f"{base}/data/{row}/history?limit={limit}", 10, 1)
        assert got["errors"] == 0, got
        history[-limit] = (got["p50"], got["p99"])
    return history


def history_line(history: dict[int, tuple[float, float]]) -> str:
    return ("`GET /data/{id}/history` of a row with 1,000 versions, one request after "
            "another: " + "; ".join(
                f"`limit={abs(limit)}` ({'wrk -c1, 10 s' if limit < 0 else 'httpx, 500'}) "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
                for limit, (p50, p99) in history.items()) + ".\n")


def history_only(db: str, row: int) -> None:
    """Only the history requests, on a database a full run left (its row of 1,000
    versions), by this tree's server pinned to CPU 0."""
    os.sched_setaffinity(0, {1})
    config = Path(tempfile.mkdtemp()) / "config.toml"
    config.write_text('[server]\nrate_limit_per_minute = 100000000\n[log]\nlevel = "warning"\n')
    server = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "etlsvc", "serve", "--port", "8413",
         "--config", str(config)], env={**os.environ, "ETLSVC_DATABASE_URL": db},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait("http://127.0.0.1:8413/health")
        history = measure_history("http://127.0.0.1:8413", row)
    finally:
        server.terminate()
        server.wait()
    head = sh("git", "rev-parse", "--short", "HEAD").stdout.strip()
    record(f"\n### {dt.date.today()}: `python bench/bench_versions.py --history-only DB` "
           f"(this tree: `{head}`)\n\n{machine()}\n\nServer on CPU 0, clients on CPU 1. "
           + history_line(history))


if __name__ == "__main__":
    main()
