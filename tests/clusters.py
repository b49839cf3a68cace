"""Throwaway PostgreSQL clusters for tests that stop, kill or replicate one.

initdb and postgres come from the embedded binaries (unprivileged in a user namespace when
run as root). A test stops or kills only its own cluster, never the server the rest of the
suite uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from etlsvc.embedded import EmbeddedPostgres, bin_dir


class Cluster:
    """A PostgreSQL cluster of this test's own, to stop, kill and start again. With a
    ``port``, it also listens on 127.0.0.1 (``tcp_dsn``), as replication needs."""

    def __init__(self, folder: Path, port: int | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.server = (EmbeddedPostgres(folder, port=port, listen="127.0.0.1",
                                        settings=settings) if port
                       else EmbeddedPostgres(folder, settings=settings))
        self.port = port
        self.dsn = self.start()

    @property
    def tcp_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        for _ in range(50):     # after a kill -9, orphaned backends may hold it a moment
            try:
                return self.server.start()
            except Exception:
                time.sleep(0.2)
        return self.server.start()

    def stop_fast(self) -> None:
        """``pg_ctl -m fast stop``: SIGINT to the postmaster, and wait."""
        self.server.stop()

    def kill_postmaster(self) -> None:
        """``kill -9`` of the postmaster."""
        proc, self.server.proc = self.server.proc, None
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def standby(self, folder: Path, port: int) -> Cluster:
        """A hot standby of this cluster (which must listen on TCP), streaming from it:
        ``pg_basebackup -R`` into ``folder``, then started on ``port``."""
        folder.mkdir(mode=0o700)
        subprocess.run(
            [str(bin_dir(self.server.version) / "pg_basebackup"), "-h", "127.0.0.1",
             "-p", str(self.port), "-U", "postgres", "-D", str(folder / "data"),
             "-R", "-X", "stream", "-c", "fast"], check=True, capture_output=True)
        return Cluster(folder, port)

    def query(self, sql: str, *args: Any) -> Any:
        async def go() -> Any:
            conn = await asyncpg.connect(self.dsn)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(go())

    def value(self, sql: str, *args: Any) -> Any:
        rows = self.query(sql, *args)
        return rows[0][0] if rows else None


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A short path under /tmp (a server's socket lives in it: 108 bytes at most),
    removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="etlsvc-pg-", dir="/tmp"))
    try:
        yield folder
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def wait_for(check: Callable[[], Any], timeout: float = 60, every: float = 0.05) -> Any:
    """The first truthy value of ``check()`` (connection errors count as falsy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, asyncpg.PostgresError, httpx.TransportError):
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {check}")


MARIADBD = shutil.which("mariadbd") or (
    "/usr/sbin/mariadbd" if Path("/usr/sbin/mariadbd").exists() else None)


class MariaDB:
    """A MariaDB server of the test's own (the machine's ``mariadbd``) with the binary log
    on, row-based, with column names: what kind mysql_cdc needs. On 127.0.0.1:``port``,
    user root without a password."""

    def __init__(self, folder: Path, port: int, settings: dict[str, str] | None = None) -> None:
        assert MARIADBD is not None
        self.folder = folder
        self.port = port
        self.settings = {"log-bin": str(folder / "binlog"), "server-id": "1",
                         "binlog-format": "ROW", "binlog-row-image": "FULL",
                         "binlog-row-metadata": "FULL", **(settings or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={folder / 'data'}",
                        "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True)
        self.start()

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}"

    def start(self) -> None:
        folder = self.folder
        self.proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={folder / 'data'}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={folder / 'sock'}", "--user=root",
             "--skip-name-resolve", "--innodb-buffer-pool-size=32M",
             f"--log-error={folder / 'error.log'}", f"--pid-file={folder / 'pid'}",
             *(f"--{k}={v}" for k, v in self.settings.items())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: self._answers(), timeout=60)

    def _answers(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), waited for."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self.proc = None
