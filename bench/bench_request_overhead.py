"""What the request deadline costs the read API: `etlsvc serve` of this tree against the
same of another tree (``--against SRC``, e.g. a worktree of the commit before), with wrk.

usage: python bench/bench_request_overhead.py --against /tmp/prev/src [--rounds 3]
       [--duration S] [--database-url URL]

One fresh database loaded with 20,000 rows by `etlsvc run`; both servers on it, pinned to
CPU 0 (wrk to CPU 1), asked in turn, round after round, for `GET /data?limit=100` and
`GET /health` at 16 and 50 connections. Appends requests/s and p99 and their ratios (this
tree / the other) to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import wait, wrk
from bench_csv import FIELDS, fresh_db, generate, machine, record, sh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="the other tree's src/ folder")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    csv = generate(20_000)
    db = fresh_db(args.database_url, "etlsvc_bench_overhead")
    work = Path(tempfile.mkdtemp(prefix="etlsvc-bench-"))
    config = work / "config.toml"
    config.write_text(textwrap.dedent(f"""\
        [server]
        rate_limit_per_minute = 0
        [log]
        level = "warning"
        [[sources]]
        name = "products"
        kind = "csv"
        path = "{csv}"
        """) + FIELDS)
    env = {**os.environ, "ETLSVC_DATABASE_URL": db}
    sh(sys.executable, "-m", "etlsvc", "run", "--no-progress", "--config", str(config), env=env)
    trees = {"this": None, "other": args.against}
    servers, ports = {}, {"this": 8411, "other": 8412}
    for name, src in trees.items():
        tree_env = {**env, **({"PYTHONPATH": src} if src else {})}
        servers[name] = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "etlsvc", "serve", "--port",
             str(ports[name]), "--config", str(config)], env=tree_env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    try:
        for name in trees:
            wait(f"http://127.0.0.1:{ports[name]}/health")
        for _ in range(args.rounds):
            for path in ("/data?limit=100", "/health"):
                for conns in (16, 50):
                    for name in trees:
                        url = f"http://127.0.0.1:{ports[name]}{path}"
                        results.setdefault((path, name, conns), []).append(
                            wrk(url, args.duration, conns))
                        time.sleep(0.5)
    finally:
        for proc in servers.values():
            proc.terminate()
            proc.wait()
    lines = []
    for path in ("/data?limit=100", "/health"):
        for conns in (16, 50):
            this = results[(path, "this", conns)]
            other = results[(path, "other", conns)]
            rps = [t["rps"] / o["rps"] for t, o in zip(this, other)]
            p99 = [t["p99"] / o["p99"] for t, o in zip(this, other)]
            lines.append(
                f"| `{path}` | {conns} | {statistics.median(t['rps'] for t in this):,.0f} | "
                f"{statistics.median(o['rps'] for o in other):,.0f} | "
                f"{' / '.join(f'{r:.3f}' for r in rps)} | "
                f"{' / '.join(f'{r:.3f}' for r in p99)} | "
                f"{sum(t['errors'] for t in this)} / {sum(o['errors'] for o in other)} |")
    record(textwrap.dedent(f"""

        ## Read API: the request deadline's cost (issue 22, point 1)

        `python bench/bench_request_overhead.py --against {args.against} --rounds
        {args.rounds} --duration {args.duration}` on {machine()}; {time.strftime('%Y-%m-%d')}.
        "this": the tree with the deadline middleware; "other": the tree given. Ratios per
        round, this / other (rps above 1 and p99 below 1 favour this tree).

        """) + HEADER + "\n".join(lines) + "\n")


HEADER = ("| request | conns | rps this (median) | rps other (median) | rps ratio per round "
          "| p99 ratio per round | non-2xx this / other |\n|---|---|---|---|---|---|---|\n")


if __name__ == "__main__":
    main()
