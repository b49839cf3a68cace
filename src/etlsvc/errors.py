"""The one error tree of etlsvc.

Every failure that reaches an operator is one of these, with a message that says what
was wrong and where (file, key, source, run). Driver and OS errors are converted once,
at the boundary where they happen, and kept as ``__cause__``.

* EtlError
  x ConfigError          bad or missing configuration (CLI exit code 2)
  x DatabaseError        PostgreSQL unreachable, migration failure, embedded server failure
  x SourceError          a source cannot be read (carries ``source``)
  x SourceBusy           sources already running in some process (carries their run ids)
    x TickTaken          a scheduler tick whose run another replica already made
  x BackfillError        a backfill that cannot be made, found or run as asked
  x AccessError          a key, share or grant that cannot be made or found as asked
  x WorkerDied           a worker process died under a task (killed, out of memory)
  x DatabaseLost         a run's database stayed away past database.reconnect_timeout

Invalid *records* are not exceptions: they are data, stored in ``etl_rejects``.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` on one line: a PostgreSQL error's ``DETAIL:`` and ``HINT:`` lines, say,
    joined with ``; `` (a log line and a run's error stay one line each)."""
    return "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def describe(exc: BaseException) -> str:
    """``Type: message`` of a driver or library exception, for one-line error messages."""
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class EtlError(Exception):
    """Base class of every etlsvc error."""


class ConfigError(EtlError):
    """The configuration is invalid."""


class DatabaseError(EtlError):
    """The database could not be reached or used."""


class BackfillError(EtlError):
    """A backfill cannot be made, found or run as asked (its range, its kind, another one
    of the source open or running); ``code`` names the case for the API."""

    def __init__(self, message: str, code: str = "backfill") -> None:
        super().__init__(message)
        self.code = code


class AccessError(EtlError):
    """A key, share or grant cannot be made or found as asked (unknown key, bad scope, a
    name taken); ``code`` names the case for the API (404 for ``not_found``, else 400)."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class RollbackError(EtlError):
    """A rollback cannot be made as asked (the run, its moment, the versions it needs, the
    position); ``code`` names the case for the API."""

    def __init__(self, message: str, code: str = "rollback") -> None:
        super().__init__(message)
        self.code = code


class SourceError(EtlError):
    """A source could not be read."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"source {source!r}: {message}")
        self.source = source
        self.message = message

    def __reduce__(self) -> tuple[type[SourceError], tuple[str, str]]:
        # Raised in worker processes: it must come back through pickle whole.
        return SourceError, (self.source, self.message)


class SourceBusy(EtlError):
    """One or more sources are being run already: ``running`` maps each to its run id."""

    def __init__(self, running: dict[str, int | None]) -> None:
        def where(run_id: int | None) -> str:
            return f" (run {run_id})" if run_id is not None else ""

        if len(running) == 1:
            [(source, run_id)] = running.items()
            super().__init__(f"source {source!r} is already running{where(run_id)}")
        else:
            named = ", ".join(f"{s!r}{where(r)}" for s, r in running.items())
            super().__init__(f"sources {named} are already running")
        self.running = running

    @property
    def source(self) -> str:
        return next(iter(self.running))

    @property
    def run_id(self) -> int | None:
        return self.running[self.source]


class TickTaken(SourceBusy):
    """A scheduler tick found that another replica already ran the source at that tick."""

    def __init__(self, source: str, run_id: int) -> None:
        EtlError.__init__(self, f"source {source!r} already ran at this tick (run {run_id})")
        self.running = {source: run_id}


class WorkerDied(EtlError):
    """A worker process died under a task (killed, or out of memory)."""


class DatabaseLost(EtlError):
    """The database stayed away longer than ``database.reconnect_timeout``."""
