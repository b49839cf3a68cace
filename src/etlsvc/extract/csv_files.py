"""Kind ``csv``: CSV files (or a glob of files, plain or gzip-compressed) streamed in
constant memory, resumable by byte offset.

Owns turning bytes into rows and knowing exactly where each row came from (finding files,
checkpoints and the worker process that parses them are ``files.py``'s):

* a chunk is cut after the last newline that is outside quotes (even count of quote
  characters before it), so every chunk holds whole records and quoted newlines are safe;
* each record's position is its physical line number and the byte offset of its first byte;
* rows the CSV reader cannot parse, with a wrong number of fields, with NUL characters or with
  bytes that are not valid in the configured encoding become rejects, never rows.

It does no validation of values (see ``transform/validate.py``) and no database work.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import io
import re
from collections.abc import AsyncIterator
from itertools import accumulate, compress, count, repeat
from operator import add, attrgetter, itemgetter, ne, sub
from pathlib import Path
from typing import Annotated, Any

import msgspec
import structlog

from etlsvc.contract import (
    Batch,
    Extraction,
    OneChar,
    Prepared,
    Reject,
)
from etlsvc.errors import ConfigError, SourceError
from etlsvc.extract import files
from etlsvc.extract.csv_scan import REJECT_PREFIX, RecordScanner
from etlsvc.extract.files import CHUNK_SIZE, FilePlan, FileSource

log = structlog.get_logger()

#: Past this much data with no record end in sight, the scanner looks at the head record.
_HEAD_SCAN = 64 << 10
_ASCII_PROBE = "\n\r\"',;|\t#"
_SURROGATE = re.compile("[\udc80-\udcff]")


class CsvSource(FileSource, tag="csv", kw_only=True):
    """A CSV file, or every file matching a glob, read as a stream of records."""

    encoding: str = "utf-8"
    delimiter: OneChar = ","
    quotechar: OneChar = '"'
    #: A header with more columns fails the run.
    max_columns: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10_000

    kind = "csv"


#: The byte-order marks of the wide encodings and the codec each names, UTF-32 first (its
#: little-endian mark begins with UTF-16's).
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
              (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def _codec(src: CsvSource, path: str, head: bytes) -> tuple[str, int]:
    """The codec to decode with and the length of the byte-order mark to skip. A UTF-16 or
    UTF-32 byte-order mark under another encoding fails the run, naming the setting (read
    as UTF-8, every other byte would be a NUL)."""
    name = codecs.lookup(src.encoding).name
    if name in ("utf-16", "utf-32"):         # the byte order from the mark, else LE
        for bom, codec in _WIDE_BOMS:
            if codec.startswith(name) and head.startswith(bom):
                return codec, len(bom)
        return f"{name}-le", 0
    if not name.startswith(("utf-16", "utf-32")):
        for bom, codec in _WIDE_BOMS:
            if head.startswith(bom):
                family, order = codec[:6], codec[7:]
                raise SourceError(src.name, f"{path}: starts with a {family.upper()} "
                                  f"{order.upper()} byte-order mark, but encoding = "
                                  f'{src.encoding!r}; set encoding = "{family}" for this '
                                  "source")
    if name in ("utf-8", "utf-8-sig"):
        return "utf-8", 3 if head.startswith(codecs.BOM_UTF8) else 0
    return name, 0


def _ascii_compatible(codec: str) -> bool:
    if codec.startswith(("utf-16", "utf-32", "utf-7")):
        return False
    try:
        return _ASCII_PROBE.encode(codec) == _ASCII_PROBE.encode("ascii")
    except UnicodeError:
        return False


class _ErrorRow(list):
    """Placeholder row for a record the CSV reader rejected; carries the message."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message


class CsvParser:
    """Turns the chunks of one file into :class:`Batch` objects (sync; runs in a worker)."""

    def __init__(self, src: CsvSource, plan: FilePlan, codec: str, bom: int) -> None:
        self.src = src
        self.plan = plan
        self.codec = codec
        self.ascii = _ascii_compatible(codec)
        self.decoder: Any = None
        self._new_decoder()
        self.header: list[str] | None = plan.header
        self.offset = plan.start          # absolute offset of the first byte not yet parsed
        self.line = plan.line
        self.hasher = plan.hasher
        self._bom_pending = bom if plan.start == 0 else 0
        self._tail: bytes | str = b"" if self.ascii else ""
        self._quote = src.quotechar
        self._limit = src.max_record_bytes
        self._scanner: RecordScanner | None = None   # following an oversized record
        # Rows of the batch being built, with positions; batch-level counters.
        self._rows: list[list[str]] = []
        self._pos: list[tuple[int, int]] = []
        self._rejects: list[Reject] = []
        self._read = 0
        self._batch_start = self.offset
        self._batch_line = self.line
        self._hashed = 0
        # Record length is enforced here (max_record_bytes), never by the reader.
        csv.field_size_limit(max(csv.field_size_limit(), 2 * self._limit + 2 * CHUNK_SIZE))

    def _new_decoder(self) -> None:
        self.decoder = None if self.ascii else codecs.getincrementaldecoder(self.codec)(
            "surrogateescape")

    # -- chunk level -------------------------------------------------------------------

    def feed(self, chunk: bytes) -> tuple[list[Batch], int | None]:
        """Parse ``chunk`` (``b""`` at end of file).

        Returns the batches it completed, and the offset to read on from when the file must be
        read again from an earlier point (a malformed record longer than the buffer: its first
        line is rejected, parsing resumes at the next line), else None.
        """
        if self._bom_pending:
            # The byte-order mark: part of the fingerprint and the offsets, not of the text.
            self.hasher.update(chunk[:self._bom_pending])
            self.offset += self._bom_pending
            chunk = chunk[self._bom_pending:]
            self._bom_pending = 0
        final = not chunk
        data: Any = chunk if self.ascii else self.decoder.decode(chunk, final)
        out: list[Batch] = []
        if self._scanner is not None:
            scanner = self._scanner
            if not scanner.scan(data, final):
                return out, None
            self._scanner = None
            data = self._settle(scanner, data, out)
            if data is None:                  # its first line only: read on after it
                self._tail = data = b"" if self.ascii else ""
                self._new_decoder()
                return out, self.offset
        pending = self._tail + data
        while pending:
            cut = len(pending) if final else self._boundary(pending)
            if cut:
                used = self._parse(pending[:cut], final and cut == len(pending), out)
                pending = pending[used:]
                if used == cut:
                    break
                if used:
                    continue
            elif len(pending) < min(self._limit, _HEAD_SCAN):
                break                         # the record goes on: wait for more
            # The record at the head: no end in sight, or the reader found it malformed.
            scanner = self._scanner_at_head(pending)
            if not scanner.scan(pending, final):
                if scanner.bytes > self._limit:
                    self._scanner, pending = scanner, pending[:0]
                break
            pending = self._settle(scanner, pending, out, head=True)
        self._tail = pending
        if final and (self._rows or self._rejects or self.offset > self._batch_start):
            out.append(self._flush())
        elif len(self._rows) + len(self._rejects) >= self.src.batch_size:
            out.append(self._flush())         # a run of rejects makes batches too
        return out, None

    def _scanner_at_head(self, pending: Any) -> RecordScanner:
        if self.header is None and len(pending) > self._limit:
            raise SourceError(self.src.name, f"{self.plan.path}: the header is longer than "
                              f"max_record_bytes ({self._limit:,} bytes)")
        return RecordScanner(pending, self.src.delimiter, self._quote,
                             len(self.header) if self.header is not None else None,
                             self.codec, self.hasher)

    def _settle(self, scanner: RecordScanner, data: Any, out: list[Batch], *,
                head: bool = False) -> Any:
        """Act on a scanner's outcome; the data left after it (None: read again from
        ``self.offset``)."""
        where = {"line": self.line + 1, "byte_offset": self.offset}
        if scanner.problem is None and scanner.bytes <= self._limit:
            # Well formed after all (a quote in an unquoted field upset the parity cut).
            used = self._parse(data[:scanner.end], True, out, whole=True)
            return data[used:]
        if self.header is None:
            raise SourceError(self.src.name, f"{self.plan.path}, line {self.line + 1}: the "
                              f"header is not valid CSV ({scanner.problem or 'too long'})")
        if scanner.problem is None:
            record = {"text": scanner.prefix, "truncated": True, "bytes": scanner.bytes,
                      "sha256": scanner.record_hash.hexdigest()}
            reason = (f"record of {scanner.bytes:,} bytes over {scanner.lines:,} lines is "
                      f"longer than max_record_bytes ({self._limit:,}); its first "
                      f"{REJECT_PREFIX:,} characters, length and SHA-256 are kept")
            self._consume(scanner.bytes, scanner.lines, scanner.file_hash_record)
            rest = data[scanner.end:]
        else:
            size, chars = scanner.first_line or (scanner.bytes, scanner.chars)
            record = {"text": scanner.prefix[:chars]}
            if chars > REJECT_PREFIX:
                record |= {"truncated": True, "bytes": size,
                           "sha256": scanner.line_hash.hexdigest()}
            reason = f"malformed CSV: {scanner.problem}; this line is rejected alone"
            self._consume(size, 1, scanner.file_hash_line)
            rest = data[chars:] if head else None
        self._rejects.append(Reject(self.plan.path, where, record, reason))
        self._read += 1
        return rest

    def _consume(self, size: int, lines: int, hasher: Any) -> None:
        """Account for bytes taken by a reject outside ``_parse``."""
        self.offset += size
        self.line += lines
        self.hasher = hasher

    def _boundary(self, data: Any) -> int:
        """End of the last whole record in ``data``: after a newline with even quotes before
        (0: none)."""
        nl, cr, quote = (b"\n", b"\r", self._quote.encode(self.codec)) if self.ascii else (
            "\n", "\r", self._quote)
        total = data.count(quote)
        end = len(data)
        pos = data.rfind(nl)
        if pos < 0:                         # old Mac files: \r only
            pos = data.rfind(cr, 0, len(data) - 1)
        after = 0
        while pos >= 0:
            after += data.count(quote, pos + 1, end)
            if (total - after) % 2 == 0:
                return pos + 1
            end = pos + 1
            pos = data.rfind(nl, 0, pos)
        return 0

    def _decode(self, part: bytes) -> tuple[str, bool]:
        try:
            text = part.decode(self.codec)
            return text, "\x00" in text
        except UnicodeDecodeError:
            return part.decode(self.codec, "surrogateescape"), True

    # -- record level ------------------------------------------------------------------

    def _parse(self, part: Any, final: bool, out: list[Batch], *,
               whole: bool = False) -> int:
        """Parse the records of ``part``; add them to the batch, flushing batches as they
        fill up; return how much of ``part`` was used.

        Parsing stops before the first record that is malformed over several lines (a stray
        quote swallows the lines after it) or that may go on after ``part`` (not ``final``):
        the caller hands it to the scanner. With ``whole`` (the scanner has decided about
        them already) every record is taken as the reader sees it.

        Per-row work is done by C code (csv, zip, map, compress); only rows that a
        whole-chunk check flags (header, blank, malformed, unclean) go through Python.
        """
        if self.ascii:
            text, dirty = self._decode(part)
            raw = part
            sizes = list(map(len, part.splitlines(keepends=True)))
        else:
            text = part
            dirty = bool(_SURROGATE.search(text)) or "\x00" in text
            sizes = [len(s.encode(self.codec, "surrogateescape"))
                     for s in io.StringIO(text, newline="")]
            raw = text.encode(self.codec, "surrogateescape")
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=self.src.delimiter,
                            quotechar=self._quote, doublequote=True, strict=True)
        pairs = zip(reader, map(attrgetter("line_num"), repeat(reader)))
        parsed: list[tuple[list[str], int]] = []
        while True:
            try:
                parsed.extend(pairs)          # keeps what it read before an error
                break
            except csv.Error as exc:          # the reader resumes at the next line
                parsed.append((_ErrorRow(f"malformed CSV: {exc}"), reader.line_num))
        entries = list(map(itemgetter(0), parsed))
        ends = list(map(itemgetter(1), parsed))
        starts = [0, *ends[:-1]]
        offsets = list(accumulate(sizes, initial=0))
        base_off, base_line = self.offset, self.line
        lines = list(map(add, starts, repeat(base_line + 1)))
        n = len(entries)
        skip = 0
        if self.header is None:                     # the first non-blank record
            skip = n
            for i, row in enumerate(entries):
                if row or isinstance(row, _ErrorRow):
                    self.header = self._header(row, lines[i],
                                               offsets[ends[i]] - offsets[starts[i]])
                    skip = i + 1
                    break
        irregular = set(range(skip))
        if self.header is not None:
            irregular.difference_update([skip - 1] if skip else [])
            irregular.update(compress(count(skip), map(ne, map(len, entries[skip:]),
                                                 repeat(len(self.header)))))
        if len(raw) > self._limit:          # a record may be too long: sizes in C, per chunk
            sizes_of = map(sub, map(offsets.__getitem__, ends), map(offsets.__getitem__, starts))
            big = compress(count(), map(self._limit.__lt__, sizes_of))
            irregular.update(i for i in big if i >= skip)
        used = len(part)
        stop = None if whole else next(
            (i for i in sorted(irregular) if i >= skip and (ends[i] - starts[i] > 1 or (
                i == n - 1 and not final and isinstance(entries[i], _ErrorRow)))), None)
        if stop is not None:
            keep_lines = starts[stop]
            used = (offsets[keep_lines] if self.ascii else
                    sum(map(len, io.StringIO(text, newline="").readlines()[:keep_lines])))
            n, raw, sizes = stop, raw[:offsets[keep_lines]], sizes[:keep_lines]
            irregular = {i for i in irregular if i < stop}
        self.offset += len(raw)
        self.line += len(sizes)
        offs = list(map(add, map(offsets.__getitem__, starts[:n]), repeat(base_off)))
        if dirty:
            irregular.update(i for i in range(skip, n) if self._unclean(entries[i]))
        mask = [True] * n
        if skip:
            mask[skip - 1] = False                  # the header row
        rejected: dict[int, Reject] = {}
        for i in irregular:
            mask[i] = False
            reject = self._irregular_row(entries[i], lines[i], offs[i],
                                   raw[offsets[starts[i]]:offsets[ends[i]]])
            if reject:
                rejected[i] = reject
        good = list(compress(range(n), mask))
        first = 0                                   # first entry not yet in a batch
        g = 0
        while True:
            need = self.src.batch_size - len(self._rows)
            take = good[g:g + need]
            last = take[-1] if len(take) == need else n - 1
            self._rows.extend(map(entries.__getitem__, take))
            self._pos.extend(zip(map(lines.__getitem__, take), map(offs.__getitem__, take)))
            rejects_here = [rejected[i] for i in sorted(rejected) if first <= i <= last]
            self._rejects.extend(rejects_here)
            self._read += len(take) + len(rejects_here)
            g += len(take)
            if len(take) < need or n == 0:
                break
            end = offsets[ends[last]]
            self.hasher.update(raw[self._hashed:end])
            self._hashed = end
            out.append(self._flush(base_off + end, base_line + ends[last]))
            first = last + 1
        self.hasher.update(raw[self._hashed:])
        self._hashed = 0
        return used

    def _header(self, row: list[str], line: int, size: int) -> list[str]:
        """The header from its row; SourceError if the row is not a usable header."""
        where = f"{self.plan.path}, line {line}: the header"
        if size > self._limit:
            raise SourceError(self.src.name, f"{where} is {size:,} bytes long, more than "
                              f"max_record_bytes ({self._limit:,})")
        if len(row) > self.src.max_columns:
            raise SourceError(self.src.name, f"{where} has {len(row):,} columns, more than "
                              f"max_columns ({self.src.max_columns:,})")
        if isinstance(row, _ErrorRow):
            raise SourceError(self.src.name, f"{where} is not valid CSV ({row.message})")
        if any("\x00" in f for f in row):
            raise SourceError(self.src.name, f"{where} contains NUL characters")
        if self._unclean(row):
            raise SourceError(self.src.name, f"{where} has bytes that are not valid "
                              f"{self.codec}: set `encoding` for this source")
        return _dedupe(row)

    def _unclean(self, row: list[str]) -> bool:
        return any("\x00" in f or _SURROGATE.search(f) for f in row)

    def _irregular_row(self, row: list[str], line: int, offset: int, raw: bytes) -> Reject | None:
        """The reject for a malformed, unclean or wrongly sized row; None for a blank line."""
        if not row and not isinstance(row, _ErrorRow):
            return None
        record: dict[str, Any]
        if len(raw) > self._limit:
            record = {"text": raw[:REJECT_PREFIX].decode(self.codec, "backslashreplace"),
                      "truncated": True, "bytes": len(raw),
                      "sha256": hashlib.sha256(raw).hexdigest()}
            return Reject(self.plan.path, {"line": line, "byte_offset": offset}, record,
                          f"record of {len(raw):,} bytes is longer than max_record_bytes "
                          f"({self._limit:,}); its first {REJECT_PREFIX:,} characters, "
                          "length and SHA-256 are kept")
        if isinstance(row, _ErrorRow):
            reason = row.message
        elif any("\x00" in f for f in row):
            reason = "NUL character in the record"
        elif self._unclean(row):
            reason = f"bytes that are not valid {self.codec} in the record"
        else:
            assert self.header is not None
            reason = (f"expected {len(self.header)} fields (as in the header), "
                      f"found {len(row)}")
        original = raw.decode(self.codec, "backslashreplace").replace("\x00", "\\x00")
        return Reject(self.plan.path, {"line": line, "byte_offset": offset},
                      {"text": original}, reason)

    def _flush(self, end: int | None = None, line: int | None = None) -> Batch:
        end = self.offset if end is None else end
        line = self.line if line is None else line
        batch = Batch(
            stream=self.plan.path, columns=self.header or [], rows=self._rows,
            positions=self._pos, rejects=self._rejects, rows_read=self._read,
            bytes_read=end - self._batch_start, lines_read=line - self._batch_line,
            state={"offset": end, "line": line, "fingerprint": self.hasher.hexdigest(),
                   "header": self.header, "codec": self.codec})
        self._rows, self._pos, self._rejects, self._read = [], [], [], 0
        self._batch_start, self._batch_line = end, line
        return batch


def _dedupe(header: list[str]) -> list[str]:
    """Header names made unique and non-empty (``a, a, ""`` → ``a, a_2, column_3``)."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(header, 1):
        name = name or f"column_{i}"
        candidate, n = name, 1
        while candidate in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate)
        out.append(candidate)
    return out


def read_header(src: CsvSource, path: str) -> list[str]:
    """The header of a file (its first non-blank record), for ``etlsvc check``."""
    with files.open_bytes(path) as f:
        head = f.read(min(src.max_record_bytes, 1 << 20))
    codec, bom = _codec(src, path, head)
    text = head[bom:].decode(codec, "replace")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=src.delimiter,
                        quotechar=src.quotechar)
    return _dedupe(next((row for row in reader if row), []))


def make_parser(src: CsvSource, plan: FilePlan, head: bytes) -> CsvParser:
    """The parser of one file, given its first bytes (for the byte-order mark)."""
    codec, bom = _codec(src, plan.path, head)
    return CsvParser(src, plan, codec, bom)


class CsvKind(files.FileKind):
    """CSV files; see the module docstring."""

    name = "csv"
    config = CsvSource
    raw_table = "raw_csv_data"
    stream_column = "file"
    position_columns = ("line", "byte_offset")
    position_keys = ("line", "byte_offset")
    record = "columns"

    def whole_read(self, src: CsvSource) -> str | None:
        return None             # with deletes = "detect", every file from its start

    def check_config(self, src: CsvSource, where: str) -> None:
        try:
            codecs.lookup(src.encoding)
        except (LookupError, ValueError):      # ValueError: a NUL in the name
            raise ConfigError(f"{where}.encoding': unknown encoding {src.encoding!r}") from None
        if src.delimiter == src.quotechar:
            raise ConfigError(f"{where}.delimiter': delimiter and quotechar are the same")

    def batches(self, ex: Extraction) -> AsyncIterator[Prepared]:
        src: CsvSource = ex.src
        return files.batches(ex, src.path, functools.partial(make_parser, src))

    async def check(self, src: CsvSource, base_dir: Path) -> str:
        paths = files.find_files(src.name, src.path, base_dir)
        for path in paths:
            header = read_header(src, path)
            if any(c not in header for c in src.fields.mapped().values()):
                raise SourceError(src.name, self.missing(src, path, header))
        return f"{len(paths)} file(s), mapped columns present"

    def missing(self, src: CsvSource, stream: str, columns: list[str]) -> str:
        """Mapped columns the header lacks, with a hint when the header looks split on
        another delimiter (``;``, ``|``, tab)."""
        absent = ", ".join(f"{c!r} (for {f})" for f, c in src.fields.mapped().items()
                           if c not in columns)
        hint = ""
        if len(columns) == 1:
            other = next((d for d in (";", "|", "\t") if d != src.delimiter and d in columns[0]),
                         None)
            if other:
                hint = (f"; the header splits on {other!r}: set delimiter = "
                        f"{other!r} for this source" if other != "\t" else
                        "; the header splits on tabs: set delimiter = \"\\t\" for this source")
        return (f"{stream}: column {absent} not in the header (columns: "
                f"{', '.join(columns) or 'none'}){hint}")


KIND = CsvKind()
