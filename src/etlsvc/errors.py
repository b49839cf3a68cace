"""The one error tree of etlsvc.

Every failure that reaches an operator is one of these, with a message that says what
was wrong and where (file, key, source, run). Driver and OS errors are converted once,
at the boundary where they happen, and kept as ``__cause__``.

* EtlError
  x ConfigError          bad or missing configuration (CLI exit code 2)
  x DatabaseError        PostgreSQL unreachable, migration failure, embedded server failure
  x SourceError          a source cannot be read (carries ``source``)
  x SourceBusy           another process is already running this source (carries ``run_id``)

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
    """The source is being run by another worker."""

    def __init__(self, source: str, run_id: int | None) -> None:
        where = f" (run {run_id})" if run_id is not None else ""
        super().__init__(f"source {source!r} is already running{where}")
        self.source = source
        self.run_id = run_id
