"""Build the container image and smoke-test it for real, as CI does (README, "Deploy").

usage: python deploy/smoke.py [--no-compose]
  (the project's virtual environment: it uses httpx and asyncpg; run as root)

1. podman with runc (installed with apt-get when missing), configured through
   CONTAINERS_CONF: runc, and open-file limits this machine allows;
2. a Debian 12 base made locally (deploy/base-image.sh), kept by podman between runs;
3. a wheelhouse made on the host, and the image built from it with no network
   (--format docker, so the HEALTHCHECK stays); its size and build time;
4. the container against this machine's PostgreSQL (reached at 10.0.2.2 through
   slirp4netns) in a database of its own: /health, POST /etl/run 401 and 202, rows on
   /data, uid 10001, HEALTHCHECK healthy on the port of the config;
5. a real Prometheus scraping the container and loading monitoring/alerts.yml: the
   metrics the rules use are there;
6. SIGTERM during a run: exit code 0, whole batches committed, and the next run loads
   the file exactly;
7. compose.yaml up with podman-compose, PostgreSQL from an image built here from Debian's
   packages (deploy/compose.smoke.yaml), --scale etlsvc=3 on a 3 s schedule: one run per
   tick, and every replica serves /data.

Exit 0 when every check passed (or no engine could be had: one line says so), else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

REPO = Path(__file__).resolve().parent.parent
BASE = "localhost/etlsvc-base:bookworm"
IMAGE = "localhost/etlsvc:smoke"
CONTAINER = "etlsvc-smoke"
PORT = 8123            # the container's port, set in its config: the HEALTHCHECK follows it
KEY = "smoke-secret"
#: Rows of the file the SIGTERM check loads: far more than the container's grace
#: (GRACE, its config's shutdown_grace_s) can load, so that the stop interrupts the run.
ROWS, GRACE = 1_000_000, 2
HOST_DB = os.environ.get("ETLSVC_TEST_DATABASE_URL",
                         "postgresql://postgres@127.0.0.1:5432/postgres")
#: The limits the issue names: image size and build time.
MAX_IMAGE_BYTES, MAX_BUILD_S = 300 * 1000 * 1000, 120


class Failed(Exception):
    """A check that did not hold."""


def say(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        raise Failed(what)


def sh(*cmd: str, check: bool = True, timeout: float = 600, **kwargs: Any) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise Failed(f"{' '.join(cmd[:4])} … exited {result.returncode}: "
                     f"{(result.stderr or result.stdout)[-2000:]}")
    return result.stdout


def podman(*args: str, **kwargs: Any) -> str:
    return sh("podman", *args, **kwargs)


# -- 1-3: the engine, the base, the image ---------------------------------------------------

def ensure_engine() -> str | None:
    """Why no engine can be had, or None once podman, runc and friends are there."""
    needed = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap",
              "iptables": "iptables", "slirp4netns": "slirp4netns",
              "prometheus": "prometheus"}
    missing = [pkg for tool, pkg in needed.items() if not shutil.which(tool)]
    if missing:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return f"cannot install {', '.join(missing)} (needs root and apt-get)"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(["apt-get", "install", "-y", "-qq", *missing, "netavark",
                                 "aardvark-dns", "uidmap"], capture_output=True, text=True,
                                env=env, timeout=900)
        if result.returncode != 0:
            return f"apt-get install {' '.join(missing)} failed: {result.stderr.strip()[-300:]}"
    if os.geteuid() != 0:
        return "the smoke test runs containers as root"
    return None


def engine_config(folder: Path) -> None:
    """runc (crun fails on this kernel's hybrid cgroups) and ulimits root may set here."""
    hard = subprocess.run(["sh", "-c", "ulimit -Hn"], capture_output=True, text=True)
    nofile = hard.stdout.strip() or "65536"
    conf = folder / "containers.conf"
    conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", '
                    f'"nproc=32768:32768"]\n[engine]\nruntime = "runc"\n')
    os.environ["CONTAINERS_CONF"] = str(conf)


def ensure_base() -> None:
    if subprocess.run(["podman", "image", "exists", BASE]).returncode == 0:
        say(True, f"base image {BASE} (kept from an earlier run)")
        return
    started = time.monotonic()
    sh(str(REPO / "deploy" / "base-image.sh"), BASE, timeout=900)
    say(True, f"base image {BASE} made with debootstrap in {time.monotonic() - started:.0f} s")


def build_image() -> None:
    wheels = REPO / "build" / "wheelhouse"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("etlsvc-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    sh(*pip, "wheel", "-w", str(wheels), str(REPO), timeout=900)
    sh(*pip, "download", "-d", str(wheels), "build==1.2.2.post1", "hatchling>=1.25",
       timeout=900)
    started = time.monotonic()
    podman("build", "-q", "--no-cache", "--format", "docker", "--build-arg", f"BASE={BASE}",
           "--build-arg", "WHEELHOUSE=build/wheelhouse", "--build-arg", "OFFLINE=1",
           "-t", IMAGE, "-f", "Containerfile", ".", cwd=REPO, timeout=900)
    seconds = time.monotonic() - started
    podman("image", "prune", "-f", check=False)     # the previous build's, and the stage's
    size = int(podman("image", "inspect", IMAGE, "--format", "{{.Size}}").strip())
    say(seconds <= MAX_BUILD_S, f"image built offline in {seconds:.0f} s (limit {MAX_BUILD_S} s)")
    say(size <= MAX_IMAGE_BYTES, f"image size {size / 1e6:.0f} MB (limit 300 MB)")
    health = podman("image", "inspect", IMAGE, "--format", "{{json .Config.Healthcheck}}")
    say("etlsvc" in health and "health" in health, f"HEALTHCHECK kept: {health.strip()}")


# -- 4-6: the container ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_container(url: str) -> str:
    """The host's PostgreSQL URL as the container reaches it (slirp4netns: 10.0.2.2)."""
    parts = urlsplit(url)
    netloc = parts.netloc.replace(parts.hostname or "", "10.0.2.2", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@contextlib.contextmanager
def database() -> Iterator[str]:
    """A database of this run's own on the host's PostgreSQL."""
    name = f"etlsvc_smoke_{os.getpid()}"
    query(HOST_DB, f'DROP DATABASE IF EXISTS "{name}"')
    query(HOST_DB, f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(HOST_DB)._replace(path=f"/{name}"))
    finally:
        query(HOST_DB, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(url: str, sql: str) -> Any:
    """The first value ``sql`` answers (None for a command), on a connection of its own."""
    async def go() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(go())


def start_run(base: str, source: str, key: str | None = KEY) -> httpx.Response:
    """POST /etl/run for ``source``, with the run key (or none)."""
    return httpx.post(f"{base}/etl/run", json={"sources": [source]}, timeout=5,
                      headers={"Authorization": f"Bearer {key}"} if key else {})


def make_files(folder: Path) -> int:
    """The container's config and a CSV of ROWS rows (1 % bad); the number of good rows."""
    folder.chmod(0o755)                  # the container's user (10001) reads it
    big, clean = folder / "big.csv", folder / "clean.csv"
    sh(sys.executable, str(REPO / "bench" / "gen_csv.py"), str(ROWS), str(big),
       "--clean", str(clean), "--bad-rate", "0.01", timeout=300)
    fields = "\n".join(f'{k} = "{v}"' for k, v in [
        ("source_id", "id"), ("title", "title"), ("description", "description"),
        ("category", "category"), ("amount", "amount"), ("url", "url"), ("tags", "tags"),
        ("event_time", "created_at")])
    (folder / "config.toml").write_text(f"""\
[log]
format = "json"
[server]
port = {PORT}
public_read = true
shutdown_grace_s = {GRACE}

[[sources]]
name = "products"
kind = "csv"
path = "/data/products.csv"
[sources.fields]
{fields}

[[sources]]
name = "big"
kind = "csv"
path = "/data/big.csv"
batch_size = 5000
[sources.fields]
{fields}
""")
    shutil.copy(REPO / "samples" / "products.csv", folder / "products.csv")
    for path in folder.iterdir():
        path.chmod(0o644)
    with clean.open(newline="") as f:
        return sum(1 for _ in csv.reader(f)) - 1       # records, not lines: fields hold newlines


def start_container(files: Path, db_url: str, host_port: int) -> None:
    podman("rm", "-f", CONTAINER, check=False)
    podman("run", "-d", "--name", CONTAINER,
           "--network", "slirp4netns:allow_host_loopback=true",
           "-p", f"127.0.0.1:{host_port}:{PORT}",
           "-e", f"ETLSVC_DATABASE_URL={in_container(db_url)}",
           "-e", f"ETLSVC_API_KEYS=smoke:run:{KEY}",
           "-e", "ETLSVC_CONFIG=/app/config.toml",
           "-v", f"{files / 'config.toml'}:/app/config.toml:ro",
           "-v", f"{files}:/data:ro", IMAGE)


def wait_for(what: str, test: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if result := test():
                return result
        time.sleep(0.2)
    logs = podman("logs", CONTAINER, check=False)[-3000:]
    raise Failed(f"{what}: not within {timeout:.0f} s\n{logs}")


def run_finished(base: str, run_id: int) -> dict[str, Any] | None:
    run = httpx.get(f"{base}/etl/runs/{run_id}", timeout=5).json()["data"]
    return run if run["status"] != "running" else None


def check_container(base: str) -> None:
    wait_for("/health 200", lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200)
    say(True, "/health answers 200")
    no_key = start_run(base, "products", key=None)
    say(no_key.status_code == 401, f"POST /etl/run without a key: {no_key.status_code}")
    started = start_run(base, "products")
    say(started.status_code == 202, f"POST /etl/run with a key: {started.status_code}")
    run = wait_for("the products run", lambda: run_finished(
        base, started.json()["data"]["runs"][0]["run_id"]))
    say(run["status"] == "succeeded", f"the run {run['status']}: {run['rows_valid']} rows")
    page = httpx.get(f"{base}/data", params={"source": "products", "limit": 5}, timeout=5)
    say(len(page.json()["data"]) == 5, "GET /data has the rows")
    uid = podman("exec", CONTAINER, "id", "-u").strip()
    say(uid == "10001", f"the service runs as uid {uid}")
    check = subprocess.run(["podman", "healthcheck", "run", CONTAINER], capture_output=True,
                           text=True)
    status = podman("inspect", CONTAINER, "--format", "{{.State.Health.Status}}").strip()
    say(check.returncode == 0 and status == "healthy",
        f"HEALTHCHECK on port {PORT} (from the config): {status}")


def check_prometheus(host_port: int, folder: Path) -> None:
    """A real Prometheus scrapes the container and loads the alerting rules."""
    shutil.copy(REPO / "monitoring" / "alerts.yml", folder / "alerts.yml")
    (folder / "prometheus.yml").write_text(f"""\
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [alerts.yml]
scrape_configs:
  - job_name: etlsvc
    static_configs: [{{targets: ["127.0.0.1:{host_port}"]}}]
""")
    port = free_port()
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={folder / 'prometheus.yml'}",
         f"--storage.tsdb.path={folder / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1"

    def series(name: str) -> int:
        answer = httpx.get(f"{api}/query", params={"query": f"count({name})"}, timeout=5)
        if answer.status_code != 200:          # still starting
            return 0
        result = answer.json()["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    try:
        wait_for("Prometheus scraping the container", lambda: series('up{job="etlsvc"} == 1'),
                 timeout=60)
        used = ["etlsvc_runs_total", "etlsvc_rows_total",
                "etlsvc_http_request_duration_seconds_bucket", "etlsvc_database_up",
                "etlsvc_source_stale", "etlsvc_source_last_success_timestamp_seconds"]
        found = {name: wait_for(f"{name} in Prometheus", lambda n=name: series(n), timeout=30)
                 for name in used}
        say(all(found.values()), "Prometheus scraped the metrics the rules use: " +
            ", ".join(f"{n} ({c} series)" for n, c in found.items()))
        groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        # The count comes from the file, so a rule Prometheus failed to load shows as missing.
        written = (REPO / "monitoring" / "alerts.yml").read_text().count("- alert:")
        say(len(rules) == written and all(r["health"] == "ok" for r in rules),
            f"Prometheus evaluates the {len(rules)} alerting rules without error "
            f"({written} in monitoring/alerts.yml)")
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def check_sigterm(base: str, db_url: str, good_rows: int) -> None:
    started = start_run(base, "big")
    say(started.status_code == 202, f"a {ROWS:,}-row run started")
    wait_for("the first batches", lambda: query(
        db_url, "SELECT count(*) FROM etl_checkpoints WHERE source = 'big'"), timeout=120)
    stopped = time.monotonic()
    podman("stop", "-t", "60", CONTAINER, timeout=120)
    code = podman("inspect", CONTAINER, "--format", "{{.State.ExitCode}}").strip()
    took = time.monotonic() - stopped
    say(code == "0" and took < GRACE + 20, f"SIGTERM mid-run: exit code {code} after "
        f"{took:.1f} s (grace {GRACE} s)")
    status = query(db_url, "SELECT status FROM etl_runs WHERE source = 'big'")
    say(status == "interrupted", f"the stopped run is marked {status}")
    read = query(db_url, "SELECT rows_read FROM etl_runs WHERE source = 'big'")
    landed = query(db_url, "SELECT (SELECT count(*) FROM raw_csv_data WHERE source = 'big') + "
                           "(SELECT count(*) FROM etl_rejects WHERE source = 'big')")
    say(0 < read < ROWS and landed == read,
        f"whole batches committed: {read} rows read, {landed} landed or rejected")
    podman("start", CONTAINER)
    wait_for("/health after the restart",
             lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200)
    again = start_run(base, "big")
    say(again.status_code == 202, f"the next run starts at once: {again.status_code}")
    run = wait_for("the next run", lambda: run_finished(
        base, again.json()["data"]["runs"][0]["run_id"]), timeout=300)
    rows = query(db_url, "SELECT count(*) FROM normalized_data WHERE source = 'big'")
    distinct = query(db_url, "SELECT count(DISTINCT source_id) FROM normalized_data "
                             "WHERE source = 'big'")
    landed = query(db_url, "SELECT (SELECT count(*) FROM raw_csv_data WHERE source = 'big') + "
                           "(SELECT count(*) FROM etl_rejects WHERE source = 'big')")
    say(run["status"] == "succeeded" and rows == distinct == good_rows and landed == ROWS,
        f"the next run completes the file exactly: {rows:,} rows ({good_rows:,} good in "
        f"the file), {landed:,} records landed or rejected once")


# -- 7: compose -------------------------------------------------------------------------------

PROJECT = "etlsvc-smoke"
PG_IMAGE = "localhost/etlsvc-postgres:15"
REPLICAS, TICK = 3, 3


def podman_compose() -> str:
    """podman-compose 1.1 or newer (--scale, !reset): $PODMAN_COMPOSE, else on the PATH."""
    found = os.environ.get("PODMAN_COMPOSE") or shutil.which("podman-compose")
    version = sh(found, "--version", check=False) if found else ""
    m = re.search(r"podman-compose version (\d+)\.(\d+)", version)
    if not m or (int(m.group(1)), int(m.group(2))) < (1, 1):
        raise Failed(f"compose needs podman-compose >= 1.1 (pip install podman-compose), "
                     f"found {version.splitlines()[0] if version else 'none'}")
    return found


def compose_down() -> None:
    """Remove the stack's containers (every replica), network and volume."""
    ids = podman("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
                 check=False).split()
    if ids:
        podman("rm", "-f", "-t", "30", *ids, check=False)
    podman("network", "rm", "-f", f"{PROJECT}_default", check=False)
    podman("volume", "rm", "-f", f"{PROJECT}_pgdata", check=False)


def in_stack(service: str) -> list[str]:
    return sorted(podman("ps", "--filter", f"label=com.docker.compose.project={PROJECT}",
                         "--filter", f"label=com.docker.compose.service={service}",
                         "--format", "{{.Names}}").split())


def stack_sql(sql: str) -> str:
    return podman("exec", f"{PROJECT}_postgres_1", "psql", "-U", "etlsvc", "-d", "etlsvc",
                  "-Atc", sql, check=False).strip()


def rows_served(container: str) -> int:
    out = podman("exec", container, "python", "-c",
                 "import json, urllib.request; print(len(json.load(urllib.request.urlopen("
                 "'http://127.0.0.1:8000/data?limit=5'))['data']))", check=False)
    return int(out.strip() or 0)


def check_compose(folder: Path) -> None:
    """compose.yaml with deploy/compose.smoke.yaml: PostgreSQL built here from Debian's
    packages, three replicas on a 3 s schedule."""
    compose = podman_compose()
    if subprocess.run(["podman", "image", "exists", PG_IMAGE]).returncode != 0:
        started = time.monotonic()
        podman("build", "-q", "--network", "host", "--build-arg", f"BASE={BASE}",
               "-f", "deploy/postgres.Containerfile", "-t", PG_IMAGE, "deploy", cwd=REPO,
               timeout=900)
        say(True, f"PostgreSQL image from Debian's packages in {time.monotonic() - started:.0f} s")
    config = folder / "compose" / "config.toml"
    config.parent.mkdir(mode=0o755)
    config.write_text((REPO / "deploy" / "config.toml").read_text().replace(
        'schedule = "15m"', f'schedule = "{TICK}s"'))
    config.chmod(0o644)
    env = {**os.environ, "POSTGRES_PASSWORD": "smoke-password", "SMOKE_CONFIG": str(config)}
    compose_down()
    sh(compose, "-p", PROJECT, "-f", "compose.yaml", "-f", "deploy/compose.smoke.yaml", "up",
       "-d", "--no-build", "--scale", f"etlsvc={REPLICAS}", cwd=REPO, env=env, timeout=300)
    try:
        replicas = in_stack("etlsvc")
        say(len(replicas) == REPLICAS, f"compose up --scale etlsvc={REPLICAS}: {replicas}")
        # The first runs load the sample; then each replica serves it.
        for name in replicas:
            wait_for(f"{name} serving /data", lambda n=name: rows_served(n) == 5, timeout=120)
        say(True, f"every replica serves /data ({len(replicas)} of {REPLICAS})")
        time.sleep(5 * TICK)
        runs, ticks, hosts = map(int, stack_sql(
            "SELECT count(*), count(DISTINCT floor(extract(epoch FROM started_at) / "
            f"{TICK})), count(DISTINCT host) FROM etl_runs WHERE trigger = 'schedule'")
            .split("|"))
        say(runs >= 5 and runs == ticks,
            f"one run per {TICK} s tick: {runs} scheduled runs in {ticks} ticks, by {hosts} "
            "of the replicas")
    finally:
        compose_down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compose", action="store_true", help="skip the compose stack")
    args = parser.parse_args()
    why_not = ensure_engine()
    if why_not:
        print(f"container smoke test skipped: {why_not}")
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="etlsvc-smoke-") as tmp:
        folder = Path(tmp)
        engine_config(folder)
        try:
            ensure_base()
            build_image()
            files = folder / "files"
            files.mkdir()
            good_rows = make_files(files)
            host_port = free_port()
            base = f"http://127.0.0.1:{host_port}"
            with database() as db_url:
                start_container(files, db_url, host_port)
                try:
                    check_container(base)
                    check_prometheus(host_port, folder)
                    check_sigterm(base, db_url, good_rows)
                finally:
                    podman("rm", "-f", CONTAINER, check=False)
            if not args.no_compose:
                check_compose(folder)
        except Failed as exc:
            print(f"container smoke test failed: {exc}", file=sys.stderr)
            return 1
    print(f"container smoke test passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
