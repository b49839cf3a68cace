"""Concurrency benchmark: does a load use both cores? Targets of issue 10, point 3.

usage: python bench/bench_concurrency.py [--rounds N] [--database-url URL]
           [--glob-settings 'NAME=TOML' ...] [--only-glob]

Interleaved, round after round, each into a fresh database:

* ``floor``: what PostgreSQL alone needs for etlsvc's data model on one connection, as
  ../shared/bench/datamodel_floor.sh measures it (its ``sqlfloor``): ``\\copy`` of the clean
  1,000,000-row file into a temp table, ``INSERT … SELECT`` into raw_csv_data building the
  JSON record, then the normalization upsert from the raw rows, in one transaction.
* ``file``: ``etlsvc run`` of the same 1,000,000 rows with 1 % bad rows (default config).
* ``file, 1 connection``: the same with ``connections_per_run = 1`` (one batch in flight).
* ``glob``: ``etlsvc run`` of a glob of 8 files × 125,000 rows (default config).
* ``glob, one after another``: the same with ``parallel_streams = 1`` and
  ``connections_per_run = 1``.

``--glob-settings`` adds glob variants with other ``[pipeline]`` settings (several joined by
``; ``), and ``--only-glob`` runs the glob variants alone.

Targets: glob ≤ 0.7 × one after another; file ≤ 0.9 × floor; peak RSS ≤ 150 MiB per process
(the largest of etlsvc and its workers). Medians over the rounds go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_csv import DATA, FIELDS, fresh_db, machine, record, sh  # noqa: E402

FLOOR = """create temp table t (id text, title text, description text, category text,
  amount text, url text, created_at text, tags text);
\\copy t from '{clean}' csv header
insert into raw_csv_data (run_id, source, file, line, byte_offset, source_key, record)
  select 1, 's', 'f', row_number() over (), 0, id, jsonb_build_object('id', id, 'title',
  title, 'description', description, 'category', category, 'amount', amount, 'url', url,
  'created_at', created_at, 'tags', tags) from t;
insert into normalized_data as n (kind, source, source_id, title, description, category,
  amount, url, tags, event_time, raw_table, raw_id, run_id)
  select 'csv', 's', record->>'id', record->>'title', record->>'description',
  record->>'category', nullif(btrim(record->>'amount'), '')::numeric, record->>'url',
  array_remove(string_to_array(record->>'tags', ';'), ''),
  nullif(record->>'created_at', '')::timestamptz, 'raw_csv_data', id, run_id
  from raw_csv_data
  on conflict (source, source_id) do update set title = excluded.title,
  description = excluded.description, category = excluded.category, amount = excluded.amount,
  url = excluded.url, tags = excluded.tags, event_time = excluded.event_time,
  raw_id = excluded.raw_id, run_id = excluded.run_id, updated_at = now()
  where (n.title, n.description, n.category, n.amount, n.url, n.tags, n.event_time)
  is distinct from (excluded.title, excluded.description, excluded.category, excluded.amount,
  excluded.url, excluded.tags, excluded.event_time);
"""


def files() -> tuple[Path, Path, list[Path]]:
    """The 1M-row file (1 % bad), its clean twin, and 8 files of 125k rows, distinct keys."""
    DATA.mkdir(exist_ok=True)
    big, clean = DATA / "conc_1000000.csv", DATA / "conc_1000000_clean.csv"
    if not clean.exists():
        sh(sys.executable, str(HERE / "gen_csv.py"), "1000000", str(big), "--clean",
           str(clean))
    glob_dir = DATA / "glob8"
    parts = [glob_dir / f"part_{k}.csv" for k in range(8)]
    if not all(p.exists() for p in parts):
        glob_dir.mkdir(exist_ok=True)
        one = DATA / "conc_125000.csv"
        sh(sys.executable, str(HERE / "gen_csv.py"), "125000", str(one))
        data = one.read_bytes()
        for k, part in enumerate(parts):   # the same rows under other keys in each file
            part.write_bytes(re.sub(rb"(?m)^SKU-", f"F{k}-".encode(), data))
    return big, clean, parts


def config(path: str, pipeline: str, extra: str = "") -> str:
    """A config of one CSV source ``s`` with ``[pipeline]`` settings and ``extra`` tables
    after its fields (rules, say)."""
    return textwrap.dedent(f"""\
        [log]
        format = "json"
        [pipeline]
        {pipeline}
        [[sources]]
        name = "s"
        kind = "csv"
        path = "{path}"
        """) + FIELDS + extra


def cpu_ticks() -> tuple[int, int]:
    """Busy and total jiffies of all cores, from /proc/stat (every process: etlsvc, its
    workers and the PostgreSQL backends)."""
    user, nice, system, idle, iowait, *rest = map(int, Path("/proc/stat").read_text()
                                                  .split("\n", 1)[0].split()[1:9])
    busy = user + nice + system + sum(rest)
    return busy, busy + idle + iowait


def busy_cores(before: tuple[int, int]) -> float:
    """How many cores were busy on average since ``before`` (a :func:`cpu_ticks`)."""
    busy, total = cpu_ticks()
    return (busy - before[0]) / max(1, total - before[1]) * (os.cpu_count() or 1)


class Timing(NamedTuple):
    seconds: float
    peak_rss: int        # bytes, the largest process; 0 where not measured
    cores: float         # cores busy on average, all processes
    db: str = ""


def run_etlsvc(url: str, work: Path, path: str, pipeline: str = "",
               extra: str = "") -> Timing:
    """Wall time, peak RSS (the largest process) and busy cores of `etlsvc run` into a fresh
    database, and that database's URL."""
    db = fresh_db(url, "etlsvc_bench_conc")
    cfg = work / "conc.toml"
    cfg.write_text(config(path, pipeline, extra))
    env = {**os.environ, "ETLSVC_DATABASE_URL": db}
    sh(sys.executable, "-m", "etlsvc", "migrate", "--config", str(cfg), env=env)
    start, ticks = time.perf_counter(), cpu_ticks()
    proc = subprocess.Popen([sys.executable, "-m", "etlsvc", "run", "--no-progress",
                             "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds, cores = time.perf_counter() - start, busy_cores(ticks)
    if status != 0:
        raise SystemExit(f"etlsvc run failed ({status})")
    return Timing(seconds, usage.ru_maxrss * 1024, cores, db)


def run_floor(url: str, work: Path, clean: Path) -> Timing:
    db = fresh_db(url, "etlsvc_bench_conc")
    cfg = work / "conc.toml"
    cfg.write_text(config(str(clean), ""))
    sh(sys.executable, "-m", "etlsvc", "migrate", "--config", str(cfg),
       env={**os.environ, "ETLSVC_DATABASE_URL": db})
    script = work / "floor.sql"
    script.write_text(FLOOR.format(clean=clean))
    start, ticks = time.perf_counter(), cpu_ticks()
    sh("psql", db, "-q", "-1", "-v", "ON_ERROR_STOP=1", "-f", str(script))
    return Timing(time.perf_counter() - start, 0, busy_cores(ticks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--glob-settings", action="append", default=[], metavar="NAME=TOML",
                    help="another glob variant with these [pipeline] settings, e.g. "
                         "'2 streams=parallel_streams = 2' (repeatable)")
    ap.add_argument("--only-glob", action="store_true", help="the glob variants alone")
    args = ap.parse_args()
    big, clean, parts = files()
    pattern = str(parts[0].parent / "part_*.csv")
    one_at_a_time = "parallel_streams = 1\nconnections_per_run = 1"
    times: dict[str, list[float]] = {}
    rss: dict[str, int] = {}
    cores: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {
            "floor": lambda: run_floor(args.database_url, work, clean),
            "file": lambda: run_etlsvc(args.database_url, work, str(big)),
            "file, 1 connection": lambda: run_etlsvc(args.database_url, work, str(big),
                                                     "connections_per_run = 1"),
            "glob": lambda: run_etlsvc(args.database_url, work, pattern),
            "glob, one after another": lambda: run_etlsvc(args.database_url, work, pattern,
                                                          one_at_a_time),
        }
        for given in args.glob_settings:
            label, _, settings = given.partition("=")
            toml = settings.replace("; ", "\n")        # several settings on one line
            variants[f"glob, {label}"] = lambda toml=toml: \
                run_etlsvc(args.database_url, work, pattern, toml)
        if args.only_glob:
            variants = {k: v for k, v in variants.items() if k.startswith("glob")}
        for round_ in range(args.rounds):
            for name, run in variants.items():
                seconds, peak, busy, _ = run()
                times.setdefault(name, []).append(seconds)
                cores.setdefault(name, []).append(busy)
                rss[name] = max(rss.get(name, 0), peak)
                print(f"round {round_ + 1} {name}: {seconds:.2f} s, {busy:.2f} cores busy"
                      + (f", peak RSS {peak / 2**20:.0f} MiB" if peak else ""), flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    serial = med["glob, one after another"]
    lines = [f"| {name} | {med[name]:.2f} s | {', '.join(f'{t:.2f}' for t in times[name])} | "
             f"{statistics.median(cores[name]):.2f} | "
             + (f"{rss[name] / 2**20:.0f} MiB |" if rss.get(name) else "— |")
             for name in variants]
    command = " ".join(["python bench/bench_concurrency.py", f"--rounds {args.rounds}",
                        *(f"--glob-settings '{g}'" for g in args.glob_settings),
                        *(["--only-glob"] if args.only_glob else [])])
    summary = [f"* glob / one after another: **{med['glob'] / serial:.2f}×** (target ≤ 0.7)"]
    summary += [f"* {name} / one after another: {med[name] / serial:.2f}×" for name in variants
                if name.startswith("glob, ") and name != "glob, one after another"]
    if "file" in med:
        summary += [f"* 1M-row file / floor: **{med['file'] / med['floor']:.2f}×** (target ≤ "
                    f"0.9); with one connection: {med['file, 1 connection'] / med['floor']:.2f}×"]
    summary += [f"* peak RSS: {max(rss.values()) / 2**20:.0f} MiB (target ≤ 150 MiB)"]
    record(f"\n### {dt.date.today()}: concurrency (issue 10, point 3): `{command}`\n\n"
           f"{machine()}\n\n| variant | median | rounds | cores busy | peak RSS (largest "
           "process) |\n|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
           + "\n".join(summary) + "\n")


if __name__ == "__main__":
    main()
