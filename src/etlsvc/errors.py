"""The one error tree of etlsvc.

Every failure that reaches an operator is one of these, with a message that says what
was wrong and where (file, key, source, run). Driver and OS errors are converted once,
at the boundary where they happen, and kept as ``__cause__``.

* EtlError
  x ConfigError          bad or missing configuration (CLI exit code 2)
  x DatabaseError        PostgreSQL unreachable, migration failure, embedded server failure
  x SourceError          a source cannot be read (carries ``source``)
  x SourceBusy           sources already running in some process (carries their run ids)

Invalid *records* are not exceptions: they are data, stored in ``etl_rejects``.
"""

from __future__ import annotations


class EtlError(Exception):
    """Base class of every etlsvc error."""


class ConfigError(EtlError):
    """The configuration is invalid."""


class DatabaseError(EtlError):
    """The database could not be reached or used."""


class SourceError(EtlError):
    """A source could not be read."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"source {source!r}: {message}")
        self.source = source


class SourceBusy(EtlError):
    """One or more sources are being run already: ``running`` maps each to its run id."""

    def __init__(self, running: dict[str, int | None]) -> None:
        named = [f"{s!r}" + (f" (run {r})" if r is not None else "")
                 for s, r in running.items()]
        if len(running) == 1:
            [(source, run_id)] = running.items()
            where = f" (run {run_id})" if run_id is not None else ""
            super().__init__(f"source {source!r} is already running{where}")
        else:
            super().__init__(f"sources {', '.join(named)} are already running")
        self.running = running

    @property
    def source(self) -> str:
        return next(iter(self.running))

    @property
    def run_id(self) -> int | None:
        return self.running[self.source]
