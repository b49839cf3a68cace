"""CSV scanning without a database: the malformed corpus files through the file reader, the
parser and the preparer of a worker (run here in process), in chunks of every size."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import msgspec
import pytest

from etlsvc.config import Source
from etlsvc.extract import files
from etlsvc.extract.csv_files import make_parser
from etlsvc.load.batches import Preparer
from tests.conftest import CORPUS

MALFORMED = CORPUS / "csv" / "etlsvc-malformed"

#: file → the physical lines that must be rejected, and nothing else (SOURCES.md there).
CASES = {
    "stray_quote_never_closes.csv": [4],
    "stray_quote_closed_by_a_later_field.csv": [4],
    "quote_followed_by_text.csv": [6],
    "inch_mark_in_unquoted_field.csv": [],
    "stray_quote_crlf.csv": [4],
    "stray_quote_last_line_no_eol.csv": [21],
    "multiline_record_wrong_field_count.csv": [6, 7],
}


def read(path: Path, chunk: int) -> tuple[list[str], list[int], int]:
    """(keys loaded, lines rejected, physical lines counted) of reading ``path`` whole, as
    ``files.read_file`` does but in process and in chunks of ``chunk`` bytes."""
    src = msgspec.convert({"name": "s", "kind": "csv", "path": str(path),
                           "fields": {"source_id": "id"}}, Source)
    stream = files.FileStream(files.plan_file(str(path), None), partial(make_parser, src),
                              Preparer(src, 1))
    data = path.read_bytes()
    keys: list[str] = []
    rejected: list[int] = []
    lines = at = 0
    while True:
        piece = data[at:at + chunk]
        prepared, seek, more = stream.feed(piece)
        assert not more                   # only a compressed chunk can hold more
        for batch in prepared:
            keys += [line.split(b"\t")[5].decode() for line in batch.payload.splitlines()]
            rejected += [r.position["line"] for r in batch.rejects]
            lines += batch.lines
        at = seek if seek is not None else at + len(piece)
        if not piece and seek is None:
            return keys, rejected, lines


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
@pytest.mark.parametrize("name", sorted(CASES))
def test_only_the_malformed_lines_are_rejected_whatever_the_chunk_size(name: str,
                                                                      chunk: int) -> None:
    path = MALFORMED / name
    keys, rejected, lines = read(path, chunk)
    assert sorted(rejected) == CASES[name]
    physical = path.read_bytes().splitlines()
    assert lines == len(physical)          # every physical line is accounted for
    # Every other record is loaded once, in order, keyed by its first field.
    expected = [line.split(b",")[0].decode() for n, line in enumerate(physical[1:], 2)
                if n not in CASES[name] and line.strip()]
    assert keys == expected


def test_a_file_without_malformed_lines_loads_every_record_in_any_chunking() -> None:
    path = CORPUS / "csv" / "csv-parser" / "large-dataset.csv"
    whole = read(path, 1 << 20)
    assert whole[1] == [] and len(whole[0]) > 7000
    assert read(path, 333) == whole
