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
* The event loop's process reads the file in chunks (aiofiles); a worker process
  decompresses, parses and prepares them (``FileStream``), so a big file never holds the
  GIL of the loop.
"""

from __future__ import annotations

import asyncio
import glob
import gzip
import hashlib
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiofiles
import structlog

from etlsvc import flow
from etlsvc.contract import Batch, Extraction, Prepared, Preparing, WorkerPool
from etlsvc.errors import SourceError

log = structlog.get_logger()

CHUNK_SIZE = 1 << 20
_HASH_BLOCK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


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
    """In a worker: a file's chunks → (decompressed →) parsed → prepared batches."""

    def __init__(self, plan: FilePlan, make_parser: Callable[[FilePlan, bytes], Parser],
                 prepare: Preparing) -> None:
        self.plan = plan
        self.prepare = prepare
        self._inflate: Any = None
        self._skip = 0
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
        self._skip = skip
        self._hash_skipped = hash_skipped

    def feed(self, chunk: bytes) -> tuple[list[Prepared], int | None]:
        """Prepared batches for a chunk of the file (``b""`` at its end), and where the
        reader must go on from if not right after this chunk."""
        if self._inflate is not None:
            data = self._decompress(chunk)
            if chunk and not data:
                return [], None
            chunk = data
        batches, seek = self.parser.feed(chunk)
        if seek is not None and self._inflate is not None:
            # Back to an earlier point: decompress again from the start, up to it (those
            # bytes are in the parser's fingerprint already).
            self._restart(seek)
            seek = 0
        return [self.prepare(b) for b in batches], seek

    def _decompress(self, chunk: bytes) -> bytes:
        """The decompressed data of ``chunk`` past the part to skip."""
        if chunk:
            data = self._inflate.decompress(chunk)
            while self._inflate.eof and self._inflate.unused_data:   # concatenated members
                rest = self._inflate.unused_data
                self._inflate = zlib.decompressobj(wbits=31)
                data += self._inflate.decompress(rest)
        else:
            if not self._inflate.eof:
                raise SourceError(self.prepare.src.name,
                                  f"{self.plan.path}: the gzip stream is truncated")
            data = self._inflate.flush()
        if self._skip:
            taken = min(self._skip, len(data))
            if self._hash_skipped:
                self.plan.hasher.update(data[:taken])
            self._skip -= taken
            data = data[taken:]
        return data


async def read_file(plan: FilePlan, workers: WorkerPool,
                    make_parser: Callable[[FilePlan, bytes], Parser],
                    prepare: Preparing) -> AsyncIterator[Prepared]:
    """Stream one file from ``plan.start``; yield its prepared batches.

    Parsing and preparing run in one worker process, which keeps the file's parser from
    chunk to chunk; this side reads the bytes with aiofiles.
    """
    if plan.todo <= 0:
        return
    log.info("reading file", file=plan.path, start=plan.start, size=plan.size)
    async with workers.open(FileStream, plan, make_parser, prepare) as stream, \
            aiofiles.open(plan.path, "rb") as f:
        await f.seek(0 if plan.compressed else plan.start)
        while True:
            chunk = await f.read(CHUNK_SIZE)
            try:
                prepared, seek = await stream.call("feed", chunk)
            except (EOFError, zlib.error) as exc:
                raise SourceError(prepare.src.name, f"{plan.path}: not a valid gzip "
                                  f"file ({exc})") from exc
            for item in prepared:
                yield item
            if seek is not None:          # a malformed record: read on after its line
                await f.seek(seek)
            elif not chunk:
                break


async def batches(ex: Extraction, pattern: str,
                  make_parser: Callable[[FilePlan, bytes], Parser]) -> AsyncIterator[Prepared]:
    """A file kind's batches: every file ``pattern`` names, each from its checkpoint on,
    ``ex.parallel_streams`` files at a time (each in its own worker process)."""
    paths = find_files(ex.src.name, pattern, ex.base_dir)
    plans = [await asyncio.to_thread(plan_file, p, ex.checkpoints.get(p)) for p in paths]
    await ex.set_total(sum(p.todo for p in plans))
    for plan in plans:
        if plan.todo <= 0:
            log.info("file unchanged since last run", file=plan.path)
    todo = [p for p in plans if p.todo > 0]
    async for batch in flow.merge((read_file(p, ex.workers, make_parser, ex.preparer)
                                   for p in todo), ex.parallel_streams):
        yield batch
