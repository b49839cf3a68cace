"""CSV load benchmark: `etlsvc run` against `psql \\copy` of the same file, in one run.

usage: python bench/bench_csv.py [ROWS ...] [--database-url URL] [--batch-size N]
       python bench/bench_csv.py ROWS --index-cost [--rounds N]

For each size (default 1,000,000): generate the file with bench/gen_csv.py (cached in
bench/data/), time `psql \\copy` of it into an all-text table, then `etlsvc run` of it into
an empty database; record both wall times, their ratio, rows/s and etlsvc's peak RSS in
bench/RESULTS.md. The server is the one at --database-url (default: $ETLSVC_BENCH_DATABASE_URL,
else postgresql://postgres@127.0.0.1:5432/postgres); fresh databases are created and dropped.

With --index-cost: what the read API's indexes (migrations 0004 and 0005) cost a load.
`etlsvc run` of the same file, with them and with them dropped, interleaved for --rounds
rounds; the ratio of the medians is recorded.

With --against REV: the same load by this tree's etlsvc and by the one of git revision REV
(checked out in a temporary worktree), interleaved: what a change costs a load as a whole.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
RESULTS = HERE / "RESULTS.md"
#: gen_csv.py's columns mapped to the normalized fields.
FIELDS = """[sources.fields]
source_id = "id"
title = "title"
description = "description"
category = "category"
amount = "amount"
url = "url"
tags = "tags"
event_time = "created_at"
"""
TEXT_TABLE = ("CREATE TABLE t (id text, title text, description text, category text, "
              "amount text, url text, created_at text, tags text)")


def products_config(path: Path, extra: str = "") -> str:
    """A config whose one source, ``products``, is the CSV file ``path`` (``extra``: more
    of its keys), with JSON logs at warning and a rate limit no benchmark reaches."""
    return textwrap.dedent(f"""\
        [server]
        rate_limit_per_minute = 100000000
        [log]
        format = "json"
        level = "warning"
        [[sources]]
        name = "products"
        kind = "csv"
        path = "{path}"
        """) + extra + FIELDS


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def with_db(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def fresh_db(url: str, name: str) -> str:
    sh("psql", url, "-qc", f'DROP DATABASE IF EXISTS "{name}"', "-c", f'CREATE DATABASE "{name}"')
    return with_db(url, name)


def generate(rows: int) -> Path:
    DATA.mkdir(exist_ok=True)
    path = DATA / f"products_{rows}.csv"
    if not path.exists():
        print(f"generating {path} …", flush=True)
        sh(sys.executable, str(HERE / "gen_csv.py"), str(rows), str(path))
    return path


def time_copy(url: str, path: Path) -> float:
    db = fresh_db(url, "etlsvc_bench_copy")
    sh("psql", db, "-qc", TEXT_TABLE)
    start = time.perf_counter()
    sh("psql", db, "-qc", f"\\copy t FROM '{path}' WITH (FORMAT csv, HEADER true)")
    return time.perf_counter() - start


#: The indexes of migrations 0004 (the read API's filters) and 0005 (the change feed).
READ_INDEXES = ("normalized_data_source_idx", "normalized_data_updated_at_brin",
                "normalized_data_event_time_brin", "normalized_data_changes_idx")


def time_etlsvc(url: str, path: Path, batch_size: int, workdir: Path,
                drop: tuple[str, ...] = (), src: Path | None = None) -> tuple[float, int, str]:
    """Wall time, peak RSS and summary line of `etlsvc run` of ``path`` into a fresh
    database (after dropping the indexes ``drop``; with the etlsvc of source tree ``src``)."""
    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
    db = fresh_db(url, "etlsvc_bench_run")
    config = workdir / "bench.toml"
    config.write_text(textwrap.dedent(f"""\
        [log]
        format = "json"
        [[sources]]
        name = "products"
        kind = "csv"
        path = "{path}"
        batch_size = {batch_size}
        """) + FIELDS)
    # migrations first, so that the timed run is the load alone
    sh(sys.executable, "-m", "etlsvc", "migrate", "--config", str(config),
       env={**env, "ETLSVC_DATABASE_URL": db})
    for index in drop:
        sh("psql", db, "-qc", f"DROP INDEX {index}")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "etlsvc", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**env, "ETLSVC_DATABASE_URL": db})
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"etlsvc run failed ({status}):\n{out[-2000:]}")
    summary = next(line for line in out.splitlines() if '"run finished"' in line)
    return seconds, usage.ru_maxrss * 1024, summary


def record(text: str) -> None:
    """Print a benchmark's section and append it to bench/RESULTS.md."""
    print(text)
    with open(RESULTS, "a") as f:
        f.write(text)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                if line.startswith("model name")), platform.processor())
    pg = sh("psql", os.environ.get("ETLSVC_BENCH_DATABASE_URL",
                                   "postgresql://postgres@127.0.0.1:5432/postgres"),
            "-Atc", "SHOW server_version").stdout.strip()
    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"PostgreSQL {pg} on the same machine")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", type=int, nargs="*", default=[1_000_000])
    ap.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--index-cost", action="store_true",
                    help="time loads with and without the read API's indexes, interleaved")
    ap.add_argument("--against", metavar="REV",
                    help="time loads by this tree and by git revision REV, interleaved")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.index_cost:
        compare(args, [("with", (), None), ("without", READ_INDEXES, None)],
                f"What the read API's indexes ({', '.join(READ_INDEXES)}) cost a load",
                "--index-cost")
        return
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "tree"
            sh("git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), args.against)
            try:
                head = sh("git", "rev-parse", "--short", "HEAD").stdout.strip()
                dirty = " with uncommitted changes" if sh(
                    "git", "status", "--porcelain", "--untracked-files=no").stdout else ""
                compare(args, [("this tree", (), None), (args.against, (), tree / "src")],
                        f"This tree (`{head}`{dirty}) against `{args.against}`",
                        f"--against {args.against}")
            finally:
                sh("git", "-C", str(HERE), "worktree", "remove", "--force", str(tree))
        return
    lines = []
    for rows in args.rows:
        path = generate(rows)
        copy_s = time_copy(args.database_url, path)
        run_s, rss, summary = time_etlsvc(args.database_url, path, args.batch_size, DATA)
        line = (f"| {rows:,} | {path.stat().st_size / 2**20:,.0f} MiB | {copy_s:.1f} s | "
                f"{run_s:.1f} s | **{run_s / copy_s:.2f}×** | {rows / run_s:,.0f} | "
                f"{rss / 2**20:.0f} MiB |")
        print(line, flush=True)
        print(summary, flush=True)
        lines.append(line)
    with open(RESULTS, "a") as f:
        f.write(f"\n### {dt.date.today()}: `python bench/bench_csv.py "
                f"{' '.join(map(str, args.rows))}` (batch_size {args.batch_size})\n\n"
                f"{machine()}\n\n"
                "| rows | file | psql \\copy | etlsvc run | ratio | etlsvc rows/s | "
                "etlsvc peak RSS |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def compare(args: argparse.Namespace, variants: list[tuple[str, tuple[str, ...], Path | None]],
            title: str, flag: str) -> None:
    """Loads of the same file by each variant (label, indexes to drop, source tree),
    interleaved for --rounds rounds; the medians and the first variant's ratio to the
    second's go to RESULTS.md."""
    import statistics

    rows = args.rows[0]
    path = generate(rows)
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for _ in range(args.rounds):
        for label, drop, src in variants:
            seconds, _, _ = time_etlsvc(args.database_url, path, args.batch_size, DATA, drop,
                                        src)
            times[label].append(seconds)
            print(f"{label}: {seconds:.1f} s", flush=True)
    (first, *_), (second, *_) = variants
    a, b = (statistics.median(times[k]) for k in (first, second))
    line = f"| {rows:,} | {args.rounds} | {a:.1f} s | {b:.1f} s | **{a / b:.3f}×** |"
    print(line)
    with open(RESULTS, "a") as f:
        f.write(f"\n### {dt.date.today()}: `python bench/bench_csv.py {rows} {flag} "
                f"--rounds {args.rounds}`\n\n{machine()}\n\n"
                f"{title}: medians of interleaved runs.\n\n"
                f"| rows | rounds | {first} | {second} | {first} / {second} |\n"
                "|---|---|---|---|---|\n" + line + "\n")


if __name__ == "__main__":
    main()
