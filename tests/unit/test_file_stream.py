"""``files.FileStream`` in process: a gzip file reads exactly as the same plain file, and
one call never decompresses more than a bounded amount, whatever the compression ratio."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest

from etlsvc.config import Source
from etlsvc.errors import SourceError
from etlsvc.extract import files
from etlsvc.extract.csv_files import make_parser as csv_parser
from etlsvc.extract.jsonl_files import JsonlParser, _first_line_wrong
from etlsvc.load.batches import Preparer

NULS = 3_000_000        # a record of NUL bytes, three times max_record_bytes


def stream(path: Path, kind: str, **keys: Any) -> files.FileStream:
    src = msgspec.convert({"name": "s", "kind": kind, "path": str(path),
                           "fields": {"source_id": "id"}, **keys}, Source)
    make = partial(csv_parser, src) if kind == "csv" else partial(JsonlParser, src)
    return files.FileStream(files.plan_file(str(path), None), make, Preparer(src, 1),
                            src.max_decompressed_bytes)


def read(path: Path, kind: str) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(payload lines, rejects, last state) of the whole file, driven as
    ``files.read_file`` drives a worker's stream."""
    s = stream(path, kind)
    data = path.read_bytes()
    rows: list[Any] = []
    rejects: list[Any] = []
    state: dict[str, Any] = {}
    at = 0
    while True:
        chunk: bytes | None = data[at:at + files.CHUNK_SIZE]
        ended, more, seek = chunk == b"", True, None
        while more:
            prepared, seek, more = s.feed(chunk)
            chunk = None
            for batch in prepared:
                rows += batch.payload.splitlines()
                rejects += [(r.position, r.reason, r.record) for r in batch.rejects]
                state = batch.state
        if seek is not None:
            at = seek
        elif ended:
            return rows, rejects, state
        else:
            at += files.CHUNK_SIZE


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_gzip_file_reads_exactly_as_the_plain_file(tmp_path: Path, kind: str) -> None:
    if kind == "csv":
        body = (b"id,title\n" + b"".join(b"k%d,t%d\n" % (i, i) for i in range(500))
                + bytes(NULS) + b"\n" + b"k9999,last\n")
    else:
        body = (b"".join(json.dumps({"id": f"k{i}"}).encode() + b"\n" for i in range(500))
                + bytes(NULS) + b"\n" + b'{"id": "k9999"}\n')
    plain = tmp_path / f"f.{kind}"
    plain.write_bytes(body)
    packed = tmp_path / f"f.{kind}.gz"
    packed.write_bytes(gzip.compress(body))
    rows, rejects, state = read(plain, kind)
    assert len(rows) == 501 and len(rejects) == 1
    assert rejects[0][0]["line"] == (502 if kind == "csv" else 501)
    z_rows, z_rejects, z_state = read(packed, kind)
    # the payload names its file; all else is the same
    assert [r.replace(b"f.%s.gz" % kind.encode(), b"f.%s" % kind.encode()) for r in z_rows] \
        == rows
    assert z_rejects == rejects
    assert {k: v for k, v in z_state.items() if k != "fingerprint"} == \
        {k: v for k, v in state.items() if k != "fingerprint"}


def test_one_call_decompresses_a_bounded_amount_of_a_bomb(tmp_path: Path) -> None:
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress(bytes(256 << 20), 9))     # 256 MiB in about 250 kB
    s = stream(path, "jsonl")
    chunk: bytes | None = path.read_bytes()
    calls, more = 0, True
    tracemalloc.start()
    try:
        while more:
            _, _, more = s.feed(chunk)
            chunk, calls = None, calls + 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert calls == 256 // 8 + 1                       # INFLATE_PER_CALL: 8 MiB
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB"


def test_max_decompressed_bytes_stops_a_file_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress(bytes(64 << 20), 9))
    s = stream(path, "jsonl", max_decompressed_bytes=16 << 20)
    chunk: bytes | None = path.read_bytes()
    with pytest.raises(SourceError, match=r"decompresses to more than 16,777,216 bytes "
                                          r"\(max_decompressed_bytes\)"):
        more = True
        while more:
            _, _, more = s.feed(chunk)
            chunk = None


@pytest.mark.parametrize(("body", "wrong"), [
    (b"\n\n" + bytes(64 << 20), "is longer than max_record_bytes (1,048,576)"),
    (b'  \n{"id": 1}\n', None),
    (b"[1, 2]\n", "is not a JSON object"),
])
def test_jsonl_check_reads_a_bounded_first_line(tmp_path: Path, body: bytes,
                                               wrong: str | None) -> None:
    path = tmp_path / "f.jsonl.gz"
    path.write_bytes(gzip.compress(body, 9))
    tracemalloc.start()
    try:
        got = _first_line_wrong(str(path), 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == wrong
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB"
