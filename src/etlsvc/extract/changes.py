"""What the change kinds (``pg_cdc``, ``mysql_cdc``) share: their records made a prepared
batch (in a worker), the future a batch's commit resolves, the batches given up when a
read fails, the key-change rule, and the recovery an operator follows when the position
in the source's log is gone."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from etlsvc.contract import OP_DELETE, OP_UPDATE, Batch, Prepared, Preparing
from etlsvc.extract.records import project, text
from etlsvc.transform.drift import shape_of_items

_encode = msgspec.json.Encoder(decimal_format="number").encode


def prepare_records(preparer: Preparing, stream: str, streams: list[str],
                    positions: list[tuple[int, ...]], records: list[dict[str, Any]],
                    unchecked: list[tuple[str, ...] | None], *, state: dict[str, Any],
                    clear: list[str] | None = None,
                    sweep: list[tuple[str, int]] | None = None,
                    value: Callable[[Any], Any] | None = None) -> Prepared:
    """In a worker: records of changes (or of a snapshot) → a prepared batch. ``streams``
    names each row's table; ``unchecked`` the columns a row lacks (None: a delete, not
    validated); ``value`` makes what msgspec cannot encode JSON (a kind's own types)."""
    src = preparer.src
    encode = _encode if value is None else msgspec.json.Encoder(
        decimal_format="number", enc_hook=value).encode
    raws = [encode(r) for r in records]
    items = [msgspec.json.decode(r) for r in raws]    # as the SQL will see them
    columns = list(dict.fromkeys(src.fields.mapped().values()))
    whole = [item for item, u in zip(items, unchecked) if u == ()]
    batch = Batch(stream, columns, project(items, columns, flat=True), positions, raws,
                  rows_read=len(items), bytes_read=sum(map(len, raws)), state=state,
                  shape=shape_of_items(whole), row_streams=streams, unchecked=unchecked,
                  clear=clear or [], sweep=sweep or [])
    return preparer(batch)


def update_rows(old: dict[str, Any] | None, new: dict[str, Any],
                key_column: str) -> list[tuple[int, dict[str, Any]]]:
    """The raw rows of an update: an update whose key changed is a delete of the old key
    (its row leaves) and an update under the new one."""
    if old is not None and old.get(key_column) is not None and \
            text(old.get(key_column)) != text(new.get(key_column)):
        return [(OP_DELETE, old), (OP_UPDATE, new)]
    return [(OP_UPDATE, new)]


def awaited(prepared: Prepared) -> Prepared:
    """``prepared`` with a future its commit resolves (``Prepared.committed``)."""
    prepared.committed = asyncio.get_running_loop().create_future()
    return prepared


def drop(building: deque[tuple[asyncio.Future[Prepared], Any]]) -> None:
    """Give up the batches being built (the read failed: they are read again)."""
    while building:
        task, _ = building.popleft()
        if task.done() and not task.cancelled():
            task.exception()            # retrieved: not logged as never retrieved
        task.cancel()


RECOVERY = ("To recover: `etlsvc cdc reset {source}` (it forgets the checkpoints{slot}), "
            "then run the source again: it snapshots its tables anew, and rows deleted "
            "meanwhile leave.")
