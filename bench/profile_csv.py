"""Where the time of a CSV run goes: wall time of each database step, CPU of the parser thread.

usage: ETLSVC_DATABASE_URL=... python bench/profile_csv.py run --config CONFIG [SOURCE]

Runs `etlsvc` in this process with the steps of a batch wrapped in timers, and prints the
totals (seconds) at the end. The database steps run on the event loop while the parsing
thread prepares the next batch, so the parser's figures overlap the others.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any

from etlsvc import cli
from etlsvc.extract import csv_files
from etlsvc.load import checkpoint
from etlsvc.load import raw as load
from etlsvc.runtime import pipeline, runs
from etlsvc.transform import normalize

TOTALS: collections.Counter[str] = collections.Counter()


def timed_async(module: Any, name: str) -> None:
    original = getattr(module, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            TOTALS[f"db: {name}"] += time.perf_counter() - start

    setattr(module, name, wrapper)


def timed_sync(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TOTALS[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> int:
    for module, name in ((normalize, "next_raw_id"), (load, "copy_raw"), (normalize, "upsert"),
                         (load, "insert_rejects"), (checkpoint, "write"), (runs, "add")):
        timed_async(module, name)
    timed_sync(csv_files.CsvParser, "feed", "thread: parse (csv, positions)")
    make_preparer = pipeline._csv_preparer

    def preparer(*args: Any) -> Any:
        prepare = make_preparer(*args)

        def timed(batch: Any) -> Any:
            start = time.perf_counter()
            try:
                return prepare(batch)
            finally:
                TOTALS["thread: prepare (validate, encode)"] += time.perf_counter() - start

        return timed

    pipeline._csv_preparer = preparer
    start = time.perf_counter()
    code = cli.main(sys.argv[1:])
    for label, seconds in sorted(TOTALS.items()):
        print(f"{label:40} {seconds:7.2f} s", file=sys.stderr)
    print(f"{'wall':40} {time.perf_counter() - start:7.2f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
