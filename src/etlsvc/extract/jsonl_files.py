"""Kind ``jsonl``: JSON Lines / NDJSON files (or a glob of them), plain or gzip-compressed.

One JSON value per line. A line that is not valid JSON (or not UTF-8), is not an object, or
is longer than ``max_record_bytes`` is one reject with its line number and byte offset;
blank lines are skipped. Each record lands in ``raw_jsonl_data`` exactly as it was on its
line. Fields map dotted paths into the object, as for API sources.

Files, globs, checkpoints (byte offset plus fingerprint; the restart rule of compressed
files) and the worker process that parses are ``files.py``'s.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog

from etlsvc.contract import (
    Batch,
    Extraction,
    Prepared,
    Reject,
)
from etlsvc.errors import SourceError
from etlsvc.extract import files
from etlsvc.extract.files import FilePlan, FileSource
from etlsvc.extract.records import json_batch

log = structlog.get_logger()

#: Characters of an oversized or undecodable line kept in its reject.
REJECT_PREFIX = 1000
_decode = msgspec.json.decode


class JsonlSource(FileSource, tag="jsonl", kw_only=True):
    """A JSON Lines file, or every file matching a glob."""

    kind = "jsonl"


@dataclass
class _LongLine:
    """A line longer than ``max_record_bytes``, being skipped through."""

    where: tuple[int, int]
    prefix: bytes
    digest: Any                       # SHA-256 of the line (without its line break)
    size: int = 0                     # its bytes without the line break
    consumed: int = 0                 # its bytes with the line break


class JsonlParser:
    """Turns the chunks of one file into batches of records (sync; runs in a worker)."""

    POSITION_KEYS = ("line", "byte_offset")

    def __init__(self, src: JsonlSource, plan: FilePlan, head: bytes) -> None:
        self.src = src
        self.path = plan.path
        self.offset = plan.start          # absolute offset of the first byte not yet parsed
        self.line = plan.line
        self.hasher = plan.hasher
        self._bom = 3 if plan.start == 0 and head.startswith(codecs.BOM_UTF8) else 0
        self._tail = b""
        self._long: _LongLine | None = None
        self._reset()

    def _reset(self) -> None:
        self._items: list[Any] = []
        self._raws: list[bytes] = []
        self._pos: list[tuple[int, int]] = []
        self._rejects: list[Reject] = []
        self._start, self._start_line = self.offset, self.line

    @property
    def _full(self) -> bool:
        return len(self._items) + len(self._rejects) >= self.src.batch_size

    def feed(self, chunk: bytes) -> tuple[list[Batch], int | None]:
        """Batches completed by ``chunk`` (``b""`` at the end of the file)."""
        if self._bom:                     # part of the offsets and fingerprint, not the text
            self._take(chunk[:self._bom], 0)
            chunk, self._bom = chunk[self._bom:], 0
        final = not chunk
        out: list[Batch] = []
        if self._long is not None:
            chunk = self._skip_long(chunk, final)
            if self._long is not None:
                return out, None
        data = self._tail + chunk
        cut = len(data) if final else data.rfind(b"\n") + 1
        for line in data[:cut].splitlines(keepends=True):
            if self._full:
                out.append(self._flush())
            self._line(line)
        self._tail = data[cut:]
        if len(self._tail) > self.src.max_record_bytes:
            tail, self._tail = self._tail, b""
            self._long = _LongLine((self.line + 1, self.offset), tail[:4 * REJECT_PREFIX],
                                   hashlib.sha256())
            self._skip_long(tail, False)
        if self._long is None and (self._full or (final and (
                self._items or self._rejects or self.offset > self._start))):
            out.append(self._flush())
        return out, None

    def _take(self, raw: bytes, lines: int) -> None:
        """Account for bytes consumed: offset, line count, fingerprint."""
        self.hasher.update(raw)
        self.offset += len(raw)
        self.line += lines

    def _line(self, raw: bytes) -> None:
        where = (self.line + 1, self.offset)
        self._take(raw, 1)
        text = raw.rstrip(b"\r\n")
        if not text.strip():
            return
        if len(text) > self.src.max_record_bytes:
            self._reject_long(_LongLine(where, text[:4 * REJECT_PREFIX],
                                        hashlib.sha256(text), len(text)))
            return
        try:
            item = _decode(text)
        except (msgspec.DecodeError, RecursionError) as exc:
            reason = ("not valid JSON: nested too deeply" if isinstance(exc, RecursionError)
                      else f"not valid JSON: {exc}")
            self._reject(where, {"text": _shown(text)}, reason)
            return
        self._items.append(item)
        self._raws.append(text)
        self._pos.append(where)

    def _skip_long(self, chunk: bytes, final: bool) -> bytes:
        """Go on through the oversized line; the data after its end (if it ended)."""
        long = self._long
        assert long is not None
        end = chunk.find(b"\n")
        part = chunk if end < 0 else chunk[:end + 1]
        body = part.rstrip(b"\r\n") if end >= 0 else part
        long.digest.update(body)
        long.size += len(body)
        long.consumed += len(part)
        self.hasher.update(part)
        if end < 0 and not final:
            return b""
        self.offset += long.consumed
        self.line += 1
        self._long = None
        self._reject_long(long)
        return chunk[end + 1:] if end >= 0 else b""

    def _reject(self, where: tuple[int, int], record: Any, reason: str) -> None:
        self._rejects.append(Reject(self.path, dict(zip(self.POSITION_KEYS, where)), record,
                                    reason))

    def _reject_long(self, long: _LongLine) -> None:
        self._reject(long.where, {"text": _shown(long.prefix), "truncated": True,
                                  "bytes": long.size, "sha256": long.digest.hexdigest()},
                     f"line of {long.size:,} bytes is longer than max_record_bytes "
                     f"({self.src.max_record_bytes:,}); its first {REJECT_PREFIX:,} "
                     "characters, length and SHA-256 are kept")

    def _flush(self) -> Batch:
        batch = json_batch(
            self.src, self.path, self._items, self._raws, self._pos, self.POSITION_KEYS,
            rejects=self._rejects, bytes_read=self.offset - self._start,
            lines=self.line - self._start_line,
            state={"offset": self.offset, "line": self.line,
                   "fingerprint": self.hasher.hexdigest()})
        self._reset()
        return batch


def _shown(text: bytes) -> str:
    """The start of a rejected line, as text (bytes that are not UTF-8 as \\xNN)."""
    return text[:4 * REJECT_PREFIX].decode("utf-8", "backslashreplace")[:REJECT_PREFIX]


class JsonlKind(files.FileKind):
    """JSON Lines files; see the module docstring."""

    name = "jsonl"
    config = JsonlSource
    raw_table = "raw_jsonl_data"
    stream_column = "file"
    position_columns = ("line", "byte_offset")
    position_keys = JsonlParser.POSITION_KEYS

    def whole_read(self, src: JsonlSource) -> str | None:
        return None             # with deletes = "detect", every file from its start

    def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        src: JsonlSource = ex.src
        return files.batches(ex, src.path, functools.partial(JsonlParser, src))

    async def check(self, src: JsonlSource, base_dir: Path) -> str:
        paths = files.find_files(src.name, src.path, base_dir)
        for path in paths:
            wrong = await asyncio.to_thread(_first_line_wrong, path, src.max_record_bytes)
            if wrong:
                raise SourceError(src.name, f"{path}: the first line {wrong}")
        return f"{len(paths)} file(s), first lines are JSON objects"


def _first_line_wrong(path: str, limit: int) -> str | None:
    """What is wrong with the file's first non-blank line, if anything. A line is read up
    to ``limit`` bytes, never whole: the file may be a decompression bomb."""
    with files.open_bytes(path) as f:
        while line := f.readline(limit + 1):
            if not line.strip():
                continue
            if len(line) > limit and not line.endswith(b"\n"):
                return f"is longer than max_record_bytes ({limit:,})"
            try:
                if isinstance(_decode(line.lstrip(codecs.BOM_UTF8)), dict):
                    return None
            except msgspec.DecodeError:
                pass
            return "is not a JSON object"
    return None


KIND = JsonlKind()
