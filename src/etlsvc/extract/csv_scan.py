"""Where a CSV record ends when the fast path cannot tell, without buffering the record.

The parser's fast path cuts chunks at a line break with an even number of quotes before it
and hands them to the C reader. That cannot see where a record ends when a quoted field is
longer than the buffer, or when a stray quote never closes properly. :class:`RecordScanner`
then follows the record from its first character, jumping from quote to quote and from
delimiter to delimiter with C-level searches, and decides:

* well formed (every closing quote followed by a delimiter or a line break, as many fields
  as the header): the record ends there; if it is longer than ``max_record_bytes`` it is one
  reject;
* malformed (a quote followed by anything else, a quote that never closes, the wrong field
  count): only its first physical line is rejected, and parsing resumes at the next line.

It keeps only what a reject needs: a bounded prefix, the length and SHA-256 of the record
and of its first line, and the file's running hash after either of them (the checkpoint's
fingerprint).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

#: Characters of an oversized or malformed record kept in its reject.
REJECT_PREFIX = 16_384

_FIELD_START, _UNQUOTED, _QUOTED, _AFTER_QUOTE, _FIRST_LINE, _AFTER_CR, _DONE = range(7)


class RecordScanner:
    """Follows one record from its first character (see the module docstring).

    Works on ``bytes`` (ASCII-compatible encodings) or ``str`` (others), fed in pieces.
    """

    def __init__(self, sample: bytes | str, delimiter: str, quote: str, columns: int | None,
                 codec: str, file_hash: Any) -> None:
        def same(s: str) -> Any:
            return s.encode(codec) if isinstance(sample, bytes) else s

        self.d, self.q, self.cr, self.lf = same(delimiter), same(quote), same("\r"), same("\n")
        self._stop = re.compile(re.escape(self.d) + same("|[\r\n]"))
        self._eol = re.compile(same("[\r\n]"))
        self.columns = columns
        self.codec = codec
        self.state = _FIELD_START
        self.fields = 1
        self.problem: str | None = None
        self.bytes = self.chars = self.breaks = 0
        #: (bytes, chars) of the first physical line, its line break included, once known.
        self.first_line: tuple[int, int] | None = None
        self.end = 0                  # where the outcome ends in the last piece scanned
        self.record_hash, self.line_hash = hashlib.sha256(), hashlib.sha256()
        self.file_hash_record, self.file_hash_line = file_hash.copy(), file_hash.copy()
        self._prefix: list[Any] = []
        self._prefix_len = 0
        self._cr_last = False         # the last character accounted for was a \r
        self._ends_with_lf = False
        self._acc = 0

    @property
    def lines(self) -> int:
        """Physical lines the record took (a last one without a line break counts)."""
        return self.breaks + (0 if self._cr_last or self._ends_with_lf else 1)

    @property
    def prefix(self) -> str:
        text = self._prefix[0][:0].join(self._prefix) if self._prefix else ""
        if isinstance(text, bytes):
            text = text.decode(self.codec, "backslashreplace")
        return text

    def scan(self, data: Any, final: bool) -> bool:
        """Scan the next piece (``final``: nothing follows); True once the outcome is known."""
        self._acc = 0
        i, n = 0, len(data)
        while self.state != _DONE and i < n:
            i = self._step(data, i, n)
        if self.state != _DONE and final:
            if self.state == _QUOTED:
                self.problem = "a quoted field opened on this line never closes"
            self._finish(data, n)
        elif self.state != _DONE:
            self._account(data, n)
        return self.state == _DONE

    def _step(self, data: Any, i: int, n: int) -> int:
        state = self.state
        if state == _FIELD_START:
            self.state = _QUOTED if data[i:i + 1] == self.q else _UNQUOTED
            return i + (self.state == _QUOTED)
        if state == _UNQUOTED:
            m = self._stop.search(data, i)
            if m is None:
                return n
            if m.group() == self.d:
                self.fields += 1
                self.state = _FIELD_START
                return m.end()
            return self._line_break(data, m.start())
        if state == _QUOTED:
            j = data.find(self.q, i)
            if j < 0:
                return n
            self.state = _AFTER_QUOTE
            return j + 1
        if state == _AFTER_QUOTE:
            c = data[i:i + 1]
            if c == self.q:
                self.state = _QUOTED
                return i + 1
            if c == self.d:
                self.fields += 1
                self.state = _FIELD_START
                return i + 1
            if c in (self.cr, self.lf):
                return self._line_break(data, i)
            shown = c.decode(self.codec, "backslashreplace") if isinstance(c, bytes) else c
            self.problem = (f"a closing quote is followed by {shown!r}, not by a delimiter "
                            "or a line break (a stray quote?)")
            self._account(data, i)
            if self.first_line is not None:
                self.end, self.state = i, _DONE
                return n
            self.state = _FIRST_LINE
            return i
        if state == _FIRST_LINE:
            m = self._eol.search(data, i)
            if m is None:
                return n
            return self._line_break(data, m.start())
        # _AFTER_CR: a \r ended the record at the end of the previous piece
        self._finish(data, 1 if data[i:i + 1] == self.lf else 0)
        return n

    def _line_break(self, data: Any, at: int) -> int:
        """A line break at ``at`` ends the record (or the first line of a malformed one)."""
        if data[at:at + 1] == self.cr:
            if at + 1 == len(data):             # a \n may follow in the next piece
                self._account(data, at + 1)
                self.state = _AFTER_CR
                return at + 1
            self._finish(data, at + 2 if data[at + 1:at + 2] == self.lf else at + 1)
        else:
            self._finish(data, at + 1)
        return len(data)

    def _finish(self, data: Any, end: int) -> None:
        self._account(data, end)
        if self.problem is None:
            self._check_fields()
        if self.first_line is None:           # no line break before the end: one line
            self.first_line = (self.bytes, self.chars)
        self.end, self.state = end, _DONE

    def _check_fields(self) -> None:
        blank = self.fields == 1 and self.bytes <= 2 and self.breaks <= 1
        if self.columns is not None and self.fields != self.columns and not blank:
            self.problem = (f"expected {self.columns} fields (as in the header), found "
                            f"{self.fields}")

    def _account(self, data: Any, upto: int) -> None:
        """Count, hash and keep the prefix of ``data[self._acc:upto]``."""
        piece = data[self._acc:upto]
        self._acc = max(self._acc, upto)
        if not piece:
            return
        raw = self._encode(piece)
        if self._prefix_len < REJECT_PREFIX:
            self._prefix.append(piece[:REJECT_PREFIX - self._prefix_len])
            self._prefix_len += len(self._prefix[-1])
        self.record_hash.update(raw)
        self.file_hash_record.update(raw)
        crlf = piece.count(self.cr + self.lf) + (self._cr_last and piece[:1] == self.lf)
        self.breaks += piece.count(self.lf) + piece.count(self.cr) - crlf
        if self.first_line is None:
            self._first_line(piece)
        self.bytes += len(raw)
        self.chars += len(piece)
        self._cr_last = piece[-1:] == self.cr
        self._ends_with_lf = piece[-1:] == self.lf

    def _encode(self, piece: Any) -> bytes:
        return piece if isinstance(piece, bytes) else piece.encode(self.codec, "surrogateescape")

    def _first_line(self, piece: Any) -> None:
        if self._cr_last:                          # the line ended with the previous \r
            end = 1 if piece[:1] == self.lf else 0
        else:
            m = self._eol.search(piece)
            if m is None or (m.group() == self.cr and m.end() == len(piece)):
                part = self._encode(piece)         # the line goes on (or a \n may follow)
                self.line_hash.update(part)
                self.file_hash_line.update(part)
                return
            end = m.end() + (m.group() == self.cr and piece[m.end():m.end() + 1] == self.lf)
        part = self._encode(piece[:end])
        self.line_hash.update(part)
        self.file_hash_line.update(part)
        self.first_line = (self.bytes + len(part), self.chars + end)
