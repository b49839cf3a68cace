"""Where the time of a run goes: wall time of each database step, CPU of the workers.

usage: ETLSVC_DATABASE_URL=... python bench/profile_csv.py run --config CONFIG [SOURCE]

Runs `etlsvc` in this process with the steps of a batch wrapped in timers, and prints the
totals (seconds) at the end. The database steps run on the event loop while the worker
processes parse and prepare the next batch, so the workers' CPU overlaps the others.
"""

from __future__ import annotations

import collections
import resource
import sys
import time
from typing import Any

from etlsvc import cli
from etlsvc.load import checkpoint, normalize, raw, shapes, write

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


def main() -> int:
    for module, name in ((normalize, "next_raw_id"), (raw, "copy"),
                         (normalize, "unique_conflicts"), (normalize, "upsert"),
                         (raw, "insert_rejects"), (normalize, "bump_version"),
                         (checkpoint, "write"), (shapes, "record"), (write, "add_counts")):
        timed_async(module, name)
    start = time.perf_counter()
    code = cli.main(sys.argv[1:])
    for label, seconds in sorted(TOTALS.items()):
        print(f"{label:40} {seconds:7.2f} s", file=sys.stderr)
    me = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{'main process: CPU (user + system)':40} {me.ru_utime + me.ru_stime:7.2f} s",
          file=sys.stderr)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{'workers: CPU (user + system)':40} {workers.ru_utime + workers.ru_stime:7.2f} s",
          file=sys.stderr)
    print(f"{'wall':40} {time.perf_counter() - start:7.2f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
