"""What data-quality rules cost a load: issue 11, point 1 (8 rules ≤ 10 % of a 1M-row load).

usage: python bench/bench_rules.py [--rounds N] [--database-url URL]

Interleaved, round after round, each into a fresh database, ``etlsvc run`` of the same
1,000,000-row CSV file (1 % bad rows):

* ``default``: the built-in checks only (source_id required, amount a number, event_time a
  timestamp);
* ``8 rules``: eight more rules the file's good rows pass — source_id regex, title required
  with a length range, description max_length, category enum, amount min/max, url type,
  tags allowed items and count, event_time bounds;
* ``8 rules + unique``: the same with ``unique = true`` on url (checked in SQL at commit).

The ratios of the medians go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_concurrency import files, run_etlsvc  # noqa: E402
from bench_csv import machine, record, sh  # noqa: E402

CATEGORIES = ["Music", "Tools", "Toys", "Shoes", "Sports", "Books", "Automotive", "Garden",
              "Grocery", "Health", "Home & Kitchen", "Outdoors", "Jewelry", "Electronics",
              "Beauty", "Clothing", "Baby", "Pet Supplies", "Office", "Movies"]
TAGS = ["2024", "clearance", "online", "2023", "limited", "bundle", "bestseller",
        "refurbished", "outdoor", "new", "eco", "premium", "kids", "imported", "sale", "vegan",
        "indoor", "exclusive", "gift", "handmade"]

RULES = f"""
[sources.rules.source_id]
regex = "^SKU-[0-9]+$"
[sources.rules.title]
required = true
min_length = 2
max_length = 120
[sources.rules.description]
max_length = 2000
[sources.rules.category]
type = "enum"
allowed = {CATEGORIES!r}
[sources.rules.amount]
min = 0
max = 1000000
[sources.rules.url]
type = "url"
[sources.rules.tags]
max_length = 10
allowed = {TAGS!r}
[sources.rules.event_time]
min = 2000-01-01T00:00:00Z
max = 2100-01-01T00:00:00Z
""".replace("'", '"')


def run(url: str, work: Path, path: Path, rules: str) -> tuple[float, int]:
    """Wall time and rows rejected of `etlsvc run` into a fresh database."""
    seconds, *_, db = run_etlsvc(url, work, str(path), extra=rules)
    return seconds, int(sh("psql", db, "-qAtc", "SELECT rows_rejected FROM etl_runs").stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    big, _, _ = files()
    variants = {"default": "", "8 rules": RULES,
                "8 rules + unique": RULES.replace('type = "url"', 'type = "url"\nunique = true')}
    times: dict[str, list[float]] = {}
    rejected: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, rules in variants.items():
                seconds, rejected[name] = run(args.database_url, Path(tmp), big, rules)
                times.setdefault(name, []).append(seconds)
                print(f"round {round_ + 1} {name}: {seconds:.2f} s, "
                      f"{rejected[name]:,} rejected", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    lines = [f"| {name} | {med[name]:.2f} s | {', '.join(f'{t:.2f}' for t in times[name])} | "
             f"{rejected[name]:,} | {med[name] / med['default']:.3f}× |" for name in variants]
    text = (f"\n### {dt.date.today()}: rules (issue 11, point 1): "
            f"`python bench/bench_rules.py --rounds {args.rounds}`\n\n{machine()}\n\n"
            "1,000,000-row CSV, 1 % bad rows, `etlsvc run` into a fresh database.\n\n"
            "| variant | median | rounds | rejected | × default |\n|---|---|---|---|---|\n"
            + "\n".join(lines) +
            f"\n\n* 8 rules: **{med['8 rules'] / med['default'] - 1:+.1%}** (target ≤ +10 %)\n"
            f"* 8 rules + unique url: {med['8 rules + unique'] / med['default'] - 1:+.1%}\n")
    record(text)


if __name__ == "__main__":
    main()
