"""Files: finding a source's files, planning where each resumes, and streaming them to a
parser in a worker process. Shared by the file kinds (``csv``, ``jsonl``).

* ``path`` is a file or a glob; the files are read in name order.
* The checkpoint of a file stores the byte offset after its last committed record and a
  SHA-256 of the bytes before it (the fingerprint). The next run continues there if the
  file was only appended to, and reads it again from the start if anything before the
  offset changed. The prefix is hashed every time: size and mtime can survive a quick edit.
* A gzip-compressed file (``.gz``) has the same checkpoint, counted in decompressed bytes.
  It cannot be entered in the middle: a resumed run decompresses it from the start and
  skips, without parsing or loading them, the bytes already committed (their fingerprint
  still decides between resuming and reading it again from the start). It is read on every
  run (members appended with ``gzip >> file`` are found), and its size for progress comes
  from its gzip trailer, so progress is an estimate.
* A backfill (``etlsvc backfill``) reads again, from their start, the files whose
  modification time is in its range of dates (or times), with checkpoints of its own.
* The event loop's process reads the file in chunks (aiofiles); a worker process
  decompresses, parses and prepares them (``FileStream``), so a big file never holds the
  GIL of the loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import glob
import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import aiofiles
import msgspec
import structlog

from etlsvc import flow
from etlsvc.contract import (
    Batch,
    BatchSize,
    ByteLimit,
    Extraction,
    Fields,
    NonEmpty,
    Prepared,
    Preparing,
    SourceConfig,
    SourceKind,
    WorkerPool,
)
from etlsvc.errors import BackfillError, SourceError

log = structlog.get_logger()

CHUNK_SIZE = 1 << 20
#: Decompressed bytes the parser gets at a time, and at most per call of the reader.
INFLATE_STEP = 1 << 20
INFLATE_PER_CALL = 8 << 20
_HASH_BLOCK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


class FileSource(SourceConfig, kw_only=True):
    """What the file kinds' sources have."""

    #: A file, or a glob (files read in name order), relative to the config file.
    path: NonEmpty
    fields: Fields
    batch_size: BatchSize = 10_000
    #: A longer record (line) is one reject, its prefix, length and SHA-256 kept (a CSV
    #: header that long fails the run).
    max_record_bytes: ByteLimit = 1 << 20
    #: A compressed file that decompresses to more than this fails the run (a
    #: decompression bomb); memory stays bounded whatever the ratio.
    max_decompressed_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 50)] = 1 << 40


@dataclass
class FilePlan:
    """One file of a source and where to read it from."""

    path: str
    #: Bytes to read in all (decompressed, for a compressed file: from its gzip trailer).
    size: int
    start: int                     # byte offset to start at
    line: int                      # lines before ``start`` (the next record's line - 1)
    header: list[str] | None       # known when resuming (CSV)
    compressed: bool = False
    #: SHA-256 of bytes [0, start), set in the worker (hash objects do not pickle).
    hasher: Any = None

    @property
    def todo(self) -> int:
        """Bytes left to read."""
        return max(0, self.size - self.start)


def find_files(name: str, path: str, base: Path) -> list[str]:
    """The files ``path`` names (a file or a glob), sorted; SourceError if none."""
    pattern = str(base / path)
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    files = [p for p in paths if os.path.isfile(p)]
    if not files:
        what = "no file matches" if glob.has_magic(pattern) else "file not found:"
        raise SourceError(name, f"{what} {pattern}")
    for p in files:
        if any(c in p for c in "\t\r\n\x00"):
            raise SourceError(name, f"file name contains a control character: {p!r}")
    return files


class FileKind(SourceKind):
    """What the file kinds share: a backfill by the files' modification time."""

    backfill_range = ("the files' modification dates (YYYY-MM-DD) or times (ISO 8601, UTC "
                      "if no offset), inclusive")

    def check_backfill(self, src: Any, stream: str | None, start: str | None,
                       end: str | None) -> str | None:
        super().check_backfill(src, stream, start, end)
        try:
            low, high = modified_window(start, end)
        except ValueError as exc:
            raise BackfillError(f"--from/--to: {exc}", "bad_range") from None
        if low is not None and high is not None and low >= high:
            raise BackfillError(f"--from {start} is after --to {end}", "bad_range")
        return None


def modified_window(start: str | None, end: str | None) -> tuple[float | None, float | None]:
    """A backfill's range of dates or times as [low, high) in seconds since 1970: a date
    covers its whole day (UTC), a time is itself. ValueError if one is neither."""
    def at(value: str, after: bool) -> float:
        if len(value) == 10:                        # a date: from its start, to its end
            day = dt.datetime.combine(dt.date.fromisoformat(value), dt.time(), dt.UTC)
            return (day + dt.timedelta(days=1) if after else day).timestamp()
        moment = dt.datetime.fromisoformat(value)
        moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
        return moment.timestamp() + (1e-6 if after else 0.0)

    return (None if start is None else at(start, False),
            None if end is None else at(end, True))


def modified_in(paths: list[str], start: str | None, end: str | None) -> list[str]:
    """The files whose modification time is in a backfill's range."""
    low, high = modified_window(start, end)
    return [p for p in paths if (low is None or os.stat(p).st_mtime >= low) and
            (high is None or os.stat(p).st_mtime < high)]


def is_gzip(path: str) -> bool:
    """Whether the file is gzip-compressed (by its magic bytes, whatever its name)."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_bytes(path: str, compressed: bool | None = None) -> Any:
    """The file opened for reading its (decompressed) bytes; gzip by its magic bytes unless
    ``compressed`` says."""
    if compressed is None:
        compressed = is_gzip(path)
    return (gzip.open if compressed else open)(path, "rb")


def _gzip_size(path: str) -> int:
    """The decompressed size a gzip file declares (its last member's, modulo 4 GiB)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def hash_prefix(path: str, length: int, compressed: bool = False) -> Any:
    """SHA-256 object fed with the first ``length`` (decompressed) bytes of the file."""
    h = hashlib.sha256()
    with open_bytes(path, compressed) as f:
        left = length
        while left > 0:
            block = f.read(min(_HASH_BLOCK, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h


def plan_file(path: str, state: dict[str, Any] | None) -> FilePlan:
    """Decide where to (re)start reading ``path`` given its checkpoint ``state``: at the
    checkpoint's offset if the bytes before it are unchanged, else from the start."""
    compressed = is_gzip(path)
    try:
        size = _gzip_size(path) if compressed else os.stat(path).st_size
    except OSError:                  # shorter than a gzip trailer: reading it says why
        size = os.stat(path).st_size
    if state:
        offset = int(state["offset"])
        if compressed or size >= offset:
            try:
                h = hash_prefix(path, offset, compressed)
            except (OSError, EOFError, zlib.error):
                h = None
            if h is not None and h.hexdigest() == state.get("fingerprint"):
                # A compressed file may have grown by a member the trailer does not count:
                # it is always read on (an unchanged one costs a decompression, no load).
                return FilePlan(path, max(size, offset + 1) if compressed else size, offset,
                                int(state["line"]), state.get("header"), compressed)
    return FilePlan(path, size, 0, 0, None, compressed)


class Parser(Protocol):
    """What a file kind's parser does with a file's bytes (in a worker process)."""

    def feed(self, chunk: bytes) -> tuple[list[Batch], int | None]:
        """Batches completed by ``chunk`` (``b""`` at the end), and an offset to read on
        from when the file must be read again from an earlier point (else None)."""
        ...


class FileStream:
    """In a worker: a file's chunks → (decompressed →) parsed → prepared batches.

    A compressed chunk is decompressed a piece at a time (``decompress(max_length)``), and
    one call hands back what at most ``INFLATE_PER_CALL`` decompressed bytes made: a chunk
    of a decompression bomb (1 MiB of gzip can hold 1 GiB) never sits in memory whole.
    """

    def __init__(self, plan: FilePlan, make_parser: Callable[[FilePlan, bytes], Parser],
                 prepare: Preparing, max_decompressed: int | None = None) -> None:
        self.plan = plan
        self.prepare = prepare
        self.max_decompressed = max_decompressed
        self._inflate: Any = None
        self._input = b""                 # compressed bytes not yet decompressed
        self._ending = False              # the reader is at the end of the file
        self._skip = 0
        self._inflated = 0                # decompressed bytes of the file so far
        if plan.compressed:
            # Entered from the start: the committed prefix is skipped, and hashed on the way.
            plan.hasher = hashlib.sha256()
            self._restart(plan.start, hash_skipped=True)
        else:
            plan.hasher = hash_prefix(plan.path, plan.start)
        with open_bytes(plan.path, plan.compressed) as f:
            head = f.read(4)
        self.parser = make_parser(plan, head)

    def _restart(self, skip: int, *, hash_skipped: bool = False) -> None:
        self._inflate = zlib.decompressobj(wbits=31)
        self._input, self._ending, self._inflated = b"", False, 0
        self._skip = skip
        self._hash_skipped = hash_skipped

    def feed(self, chunk: bytes | None) -> tuple[list[Prepared], int | None, bool]:
        """Prepared batches for a chunk of the file (``b""`` at its end; None: go on with
        the chunk before), where the reader must go on from if not right after this chunk,
        and whether the chunk holds more (then the reader calls again with None)."""
        if self._inflate is None:
            batches, seek = self.parser.feed(chunk or b"")
            return [self.prepare(b) for b in batches], seek, False
        if chunk is not None:
            self._input += chunk
            self._ending = not chunk
        prepared: list[Prepared] = []
        budget = INFLATE_PER_CALL
        while budget > 0 and (piece := self._next_piece()) is not None:
            budget -= len(piece)
            piece = self._past_skip(piece)
            if not piece:
                continue
            batches, seek = self.parser.feed(piece)
            prepared += [self.prepare(b) for b in batches]
            if seek is not None:
                # Back to an earlier point: decompress again from the start, up to it
                # (those bytes are in the parser's fingerprint already).
                self._restart(seek)
                return prepared, 0, False
        if budget <= 0:
            return prepared, None, True
        if self._ending:
            if not self._inflate.eof:
                raise SourceError(self.prepare.src.name,
                                  f"{self.plan.path}: the gzip stream is truncated")
            batches, _ = self.parser.feed(b"")
            prepared += [self.prepare(b) for b in batches]
        return prepared, None, False

    def _next_piece(self) -> bytes | None:
        """At most ``INFLATE_STEP`` decompressed bytes of the input held (members
        concatenated with ``gzip >>`` included); None once it is used up."""
        while True:
            if self._inflate.eof:
                rest = self._inflate.unused_data + self._input
                if not rest:
                    return None
                self._inflate = zlib.decompressobj(wbits=31)
                self._input = rest
            if not self._input:
                return None
            data = self._inflate.decompress(self._input, INFLATE_STEP)
            self._input = self._inflate.unconsumed_tail
            if data:
                self._inflated += len(data)
                if self.max_decompressed is not None and self._inflated > self.max_decompressed:
                    raise SourceError(
                        self.prepare.src.name,
                        f"{self.plan.path}: decompresses to more than "
                        f"{self.max_decompressed:,} bytes (max_decompressed_bytes); "
                        "raise it if the file is genuine")
                return data

    def _past_skip(self, data: bytes) -> bytes:
        """``data`` without the part of the committed prefix it holds (hashed)."""
        if self._skip:
            taken = min(self._skip, len(data))
            if self._hash_skipped:
                self.plan.hasher.update(data[:taken])
            self._skip -= taken
            data = data[taken:]
        return data


async def read_file(plan: FilePlan, workers: WorkerPool,
                    make_parser: Callable[[FilePlan, bytes], Parser],
                    prepare: Preparing, max_decompressed: int) -> AsyncIterator[Prepared]:
    """Stream one file from ``plan.start``; yield its prepared batches.

    Parsing and preparing run in one worker process, which keeps the file's parser from
    chunk to chunk; this side reads the bytes with aiofiles.
    """
    if plan.todo <= 0:
        return
    log.info("reading file", file=plan.path, start=plan.start, size=plan.size)
    async with workers.open(FileStream, plan, make_parser, prepare,
                            max_decompressed) as stream, \
            aiofiles.open(plan.path, "rb") as f:
        await f.seek(0 if plan.compressed else plan.start)
        while True:
            chunk: bytes | None = await f.read(CHUNK_SIZE)
            ended, more = chunk == b"", True
            while more:
                try:
                    prepared, seek, more = await stream.call("feed", chunk)
                except (EOFError, zlib.error) as exc:
                    raise SourceError(prepare.src.name, f"{plan.path}: not a valid gzip "
                                      f"file ({exc})") from exc
                for item in prepared:
                    yield item
                chunk = None
            if seek is not None:          # a malformed record: read on after its line
                await f.seek(seek)
            elif ended:
                _check_not_truncated(plan, prepare.src.name, await f.tell(),
                                     os.fstat(f.fileno()).st_size)
                break


def _check_not_truncated(plan: FilePlan, source: str, position: int, size: int) -> None:
    """SourceError if the file ends before where it was read to: it was truncated in place
    while being read (``copytruncate`` log rotation). What it held past the point read went
    to the rotated copy, which this source does not read: the run must not look whole."""
    if not plan.compressed and size < position:
        raise SourceError(source, f"{plan.path}: truncated while being read (now {size:,} "
                          f"bytes, {position:,} read; copytruncate log rotation?): what it "
                          "held after the records loaded is not loaded; the next run reads "
                          "the file from its start")


async def batches(ex: Extraction, pattern: str,
                  make_parser: Callable[[FilePlan, bytes], Parser]) -> AsyncIterator[Prepared]:
    """A file kind's batches: every file ``pattern`` names, each from its checkpoint on,
    ``ex.parallel_streams`` files at a time (each in its own worker process)."""
    paths = find_files(ex.src.name, pattern, ex.base_dir)
    if ex.backfill is not None:
        paths = modified_in(paths, ex.backfill.start, ex.backfill.end)
        log.info("backfill of files", files=len(paths), start=ex.backfill.start,
                 end=ex.backfill.end)
        if not paths:
            ex.warn(f"no file of {pattern} was modified in the backfill's range")
    plans = [await asyncio.to_thread(plan_file, p, ex.checkpoints.get(p)) for p in paths]
    await ex.set_total(sum(p.todo for p in plans))
    for plan in plans:
        if plan.todo <= 0:
            log.info("file unchanged since last run", file=plan.path)
    todo = [p for p in plans if p.todo > 0]
    src: FileSource = ex.src
    async for batch in flow.merge((read_file(p, ex.workers, make_parser, ex.preparer,
                                             src.max_decompressed_bytes)
                                   for p in todo), ex.parallel_streams):
        yield batch
