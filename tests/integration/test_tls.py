"""TLS to PostgreSQL with certificate verification, against a cluster this test starts with
``ssl = on``, a certificate for ``localhost`` and a CA it makes itself (Debian's PostgreSQL
binaries: the embedded ones are built without OpenSSL). The cluster accepts TLS only."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import Env, csv_source
from tests.integration.test_service import free_port, servers

PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=None)
OPENSSL = shutil.which("openssl")


def _postgres_user() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not (PG_BIN and OPENSSL and os.geteuid() == 0 and _postgres_user()),
    reason="needs Debian's PostgreSQL binaries, openssl, root and the postgres user")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder)


@dataclass
class TlsCluster:
    port: int
    ca: Path
    wrong_ca: Path

    def url(self, host: str = "localhost", **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://postgres@{host}:{self.port}/postgres" + (f"?{query}" if query
                                                                         else "")


@pytest.fixture
def tls_cluster() -> Iterator[TlsCluster]:
    # Outside pytest's temp dirs, which the postgres user may not enter.
    tmp_path = Path(tempfile.mkdtemp(prefix="etlsvc-tls-"))
    try:
        yield from _cluster(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _cluster(tmp_path: Path) -> Iterator[TlsCluster]:
    certs = tmp_path / "certs"
    certs.mkdir()
    make_ca(certs, "test-ca")
    make_ca(certs, "other-ca")
    # The server's certificate names localhost only: 127.0.0.1 is a host name mismatch.
    (certs / "san.ext").write_text("subjectAltName = DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr", cwd=certs)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "test-ca.crt", "-CAkey", "test-ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt",
            cwd=certs)
    data, port = tmp_path / "pgdata", free_port()
    owner = pwd.getpwnam("postgres")
    for path in (tmp_path, certs, certs / "server.key", certs / "server.crt"):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    (certs / "server.key").chmod(0o600)

    def as_postgres(*cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd]

    subprocess.run(as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                               "--auth=trust", "--no-instructions"),
                   check=True, capture_output=True)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"ssl = on\nssl_cert_file = '{certs / 'server.crt'}'\n"
                   f"ssl_key_file = '{certs / 'server.key'}'\nport = {port}\n"
                   f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{tmp_path}'\n")
    # TLS or nothing.
    (data / "pg_hba.conf").write_text("hostssl all all 127.0.0.1/32 trust\n"
                                      "host all all 127.0.0.1/32 reject\n")
    server = subprocess.Popen(as_postgres(str(PG_BIN / "postgres"), "-D", str(data)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p",
                               str(port)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        yield TlsCluster(port, certs / "test-ca.crt", certs / "other-ca.crt")
    finally:
        server.terminate()
        server.wait(30)


def tls_sessions(cluster: TlsCluster) -> list[bool]:
    """Whether each etlsvc session on the cluster is encrypted."""

    async def go() -> list[bool]:
        conn = await asyncpg.connect(cluster.url(sslmode="require"))
        try:
            return [r["ssl"] for r in await conn.fetch(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                "WHERE a.application_name = 'etlsvc'")]
        finally:
            await conn.close()

    return asyncio.run(go())


def test_verify_full_in_the_url_loads_and_serves_over_tls(
        tls_cluster: TlsCluster, env: Env, gen_csv, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = gen_csv(2_000)
    url = tls_cluster.url(sslmode="verify-full", sslrootcert=str(tls_cluster.ca))
    env.database_url = url
    env.write_config(csv_source("products", path))
    run = env.cli("run")
    assert run.returncode == 0, run.stderr[-2000:]
    monkeypatch.setenv("ETLSVC_API_KEYS", "k")
    with servers(env) as (server,):
        page = httpx.get(f"{server.base}/data", params={"limit": 5})
        assert page.status_code == 200 and len(page.json()["data"]) == 5
        sessions = tls_sessions(tls_cluster)
    # Both pools (the ETL pool and the read pool's sessions) were up, all encrypted.
    assert len(sessions) >= 2 and all(sessions), sessions


def with_database_keys(env: Env, sources: str, keys: str) -> None:
    """Write the config with ``keys`` added to its ``[database]`` table."""
    config = env.write_config(sources)
    config.write_text(config.read_text().replace("[database]\n", f"[database]\n{keys}", 1))


def test_verify_full_in_the_config_covers_both_pools(
        tls_cluster: TlsCluster, env: Env, gen_csv, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = gen_csv(2_000)
    env.database_url = tls_cluster.url()
    with_database_keys(env, csv_source("products", path),
                       f'sslmode = "verify-full"\nsslrootcert = "{tls_cluster.ca}"\n'
                       f'read_url = "{tls_cluster.url()}"\n')
    run = env.cli("run")
    assert run.returncode == 0, run.stderr[-2000:]
    monkeypatch.setenv("ETLSVC_API_KEYS", "k")
    with servers(env) as (server,):
        assert httpx.get(f"{server.base}/data", params={"limit": 5}).status_code == 200
        sessions = tls_sessions(tls_cluster)
    assert len(sessions) >= 2 and all(sessions), sessions


@pytest.mark.parametrize("problem", ["wrong_ca", "wrong_host", "no_ca"])
def test_a_certificate_that_does_not_verify_fails_in_one_clear_line(
        tls_cluster: TlsCluster, env: Env, problem: str) -> None:
    host = "127.0.0.1" if problem == "wrong_host" else "localhost"
    ca = tls_cluster.wrong_ca if problem == "wrong_ca" else tls_cluster.ca
    env.database_url = tls_cluster.url(host)
    with_database_keys(env, "", 'sslmode = "verify-full"\n' + (
        "" if problem == "no_ca" else f'sslrootcert = "{ca}"\n'))
    result = env.cli("migrate")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    expected = {"wrong_ca": "TLS certificate was not accepted (unable to get local issuer "
                            "certificate)",
                "wrong_host": "certificate is not valid for '127.0.0.1'",
                "no_ca": "'database.sslmode' = 'verify-full' needs 'database.sslrootcert'"}
    assert expected[problem] in lines[0], lines[0]
