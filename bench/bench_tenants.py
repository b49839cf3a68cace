"""What tenants cost the read API (issue #25): `GET /data?limit=100`, the first page, with
row-level security on (this tree: each read a transaction as etlsvc_api that sets the key's
tenant) against the commit before tenants (`--against`, default 89ba287), interleaved.

usage: python bench/bench_tenants.py [--against REV] [--rows N] [--rounds R] [--duration S]

The N-row CSV (default 1,000,000, bench/gen_csv.py) is loaded by this tree into one
database, as the source `products` of the tenant `acme`, beside a 2,000-row source of the
tenant `globex`. Both servers serve that database (REV's ignores the migration it does not
know), each pinned to CPU 0 in turn with wrk on CPU 1: REV's without a key (it has no
tenants), this tree's with acme's key, at 16 and 50 connections, R rounds. Ratios (this
tree / REV, requests per second) go to bench/RESULTS.md, with the CPU time each request
cost the server process and the database's backends (utime + stime from /proc, so only
with PostgreSQL on this machine): what row-level security costs, apart from the noise of
a shared machine's requests per second.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import wait, wrk
from bench_csv import FIELDS, fresh_db, generate, machine, products_config, record, sh

HERE = Path(__file__).resolve().parent
KEYS = "acme-reader@acme:read:acme-key,globex-reader@globex:read:globex-key"


def cpu_seconds(pid: int | str) -> float:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backends_cpu(database: str) -> float:
    """CPU time so far of the PostgreSQL backends connected to ``database``."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f" {database} ".encode() in Path(f"/proc/{pid}/cmdline").read_bytes() + b" ":
                total += cpu_seconds(pid)
        except OSError:
            pass                # gone, or not ours to read
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="89ba287")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--database-url", default=os.environ.get(
        "ETLSVC_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="etlsvc-bench-tenants-"))
    config = work / "config.toml"
    config.write_text(
        products_config(generate(args.rows), 'tenant = "acme"\n') +
        f'[[sources]]\nname = "other"\nkind = "csv"\npath = "{generate(2_000)}"\n'
        f'tenant = "globex"\n' + FIELDS)
    # REV's config: the same, without the key it does not know.
    old_config = work / "old.toml"
    old_config.write_text("".join(line for line in config.read_text().splitlines(True)
                                  if not line.startswith("tenant =")))
    db = fresh_db(args.database_url, "etlsvc_bench_tenants")
    env = {**os.environ, "ETLSVC_DATABASE_URL": db, "ETLSVC_API_KEYS": KEYS}
    print("loading …", flush=True)
    for name in ("products", "other"):
        sh(sys.executable, "-m", "etlsvc", "run", name, "--config", str(config), env=env)
    sh("psql", db, "-qc", "VACUUM (ANALYZE)")
    tree = work / "tree"
    sh("git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), args.against)
    servers = []
    try:
        for port, src, cfg in ((8421, None, config), (8422, tree / "src", old_config)):
            servers.append(subprocess.Popen(
                ["taskset", "-c", "0", sys.executable, "-m", "etlsvc", "serve", "--port",
                 str(port), "--config", str(cfg)],
                env={**env, **({"PYTHONPATH": str(src)} if src else {})},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait("http://127.0.0.1:8421/health")
        wait("http://127.0.0.1:8422/health")
        scenarios = [(f"{args.against} /data", servers[1],
                      "http://127.0.0.1:8422/data?limit=100", None),
                     ("this tree /data, acme's key", servers[0],
                      "http://127.0.0.1:8421/data?limit=100", "Authorization: Bearer acme-key")]
        db_name = db.rsplit("/", 1)[1]
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            for conns in (16, 50):
                for name, server, url, header in scenarios:
                    before = cpu_seconds(server.pid), backends_cpu(db_name)
                    got = wrk(url, args.duration, conns, header=header)
                    got["server_us"] = (cpu_seconds(server.pid) - before[0]) / \
                        got["requests"] * 1e6
                    got["pg_us"] = (backends_cpu(db_name) - before[1]) / got["requests"] * 1e6
                    assert got["errors"] == 0, (name, got)
                    results.setdefault((name, conns), []).append(got)
                    print(rnd, conns, name, got, flush=True)
    finally:
        for s in servers:
            s.terminate()
            s.wait()
        sh("git", "-C", str(HERE), "worktree", "remove", "--force", str(tree))

    def median(name: str, conns: int, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, conns)])

    base = scenarios[0][0]
    lines = [f"| {name} | {conns} | {median(name, conns, 'rps'):,.0f} | "
             f"{median(name, conns, 'p50'):.2f} ms | {median(name, conns, 'p99'):.2f} ms | "
             f"{median(name, conns, 'server_us'):,.0f} µs | "
             f"{median(name, conns, 'pg_us'):,.0f} µs | "
             f"**{median(name, conns, 'rps') / median(base, conns, 'rps'):.2f}×** |"
             for conns in (16, 50) for name, *_ in scenarios]
    rounds = "\n".join(
        f"* {conns} connections, this tree / {args.against} per round: " + ", ".join(
            f"{t['rps'] / b['rps']:.2f}×" for t, b in zip(results[(scenarios[1][0], conns)],
                                                        results[(base, conns)]))
        for conns in (16, 50))
    head = sh("git", "rev-parse", "--short", "HEAD").stdout.strip()
    record(f"\n### {dt.date.today()}: `python bench/bench_tenants.py --rows {args.rows} "
           f"--rounds {args.rounds} --against {args.against}` (this tree: `{head}`)\n\n"
           f"{machine()}\n\n`GET /data?limit=100`, first page, with row-level security "
           f"(this tree) and without ({args.against}); wrk, median of {args.rounds} "
           f"interleaved rounds of {args.duration} s; server on CPU 0, wrk on CPU 1; CPU "
           f"time per request of the server process and of the database's backends:\n\n"
           f"| request | connections | requests/s | p50 | p99 | server CPU | PostgreSQL CPU "
           f"| vs {args.against} |\n"
           "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n" + rounds + "\n")


if __name__ == "__main__":
    main()
