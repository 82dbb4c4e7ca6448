"""Sealed flush batches: rows of one swapped-out counter window, with a stable id.

The id is written to the ``flush_batches`` ledger in the same transaction as the counts, so a
batch retried after an ambiguous failure, or replayed from the spool, is applied once.

A batch holds its rows as the counter engine encodes them: PostgreSQL binary COPY tuples of
``pixel_counts``' columns in key order, ready to stream into the table or the staging table.
No Python object is made per row, so
sealing a window of a million keys costs the event loop next to nothing: the engine sorts and
encodes without the GIL, on a thread of its own at a low priority (nice 10, on Linux), while the
sealing thread waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import io
import struct
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson

from _fastcount import COLUMNS, Counters, Window, last_copy_tuple

# Rows per batch, at most. A bigger window makes several batches, which the flusher merges
# over several connections at once; each is a transaction of its own, short enough that a
# retry repeats little.
BATCH_ROWS = 100_000

# PostgreSQL's binary COPY file: a signature, flags and header extension length, the tuples,
# then a field count of -1.
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)

# A key as a tuple holds it: the bucket as timestamptz microseconds, then the dimensions.
Key = tuple[int, str, str, str, str]
_INT32 = struct.Struct(">i")
_KEY_HEAD = struct.Struct(">hiq")  # field count, the bucket's length, the bucket
_COUNTS = struct.Struct(">" + "iq" * len(COLUMNS))  # each count's length and value
# Where PostgreSQL's timestamptz counts its microseconds from: 2000-01-01 00:00 UTC.
POSTGRES_EPOCH = 946_684_800


@dataclasses.dataclass(frozen=True)
class Batch:
    batch_id: uuid.UUID
    rows: int
    tuples: bytes  # the rows as binary COPY tuples, in key order
    last_tuple: int  # where the last of them starts

    def first_key(self) -> Key:
        return _key_at(self.tuples, 0)[0]

    def last_key(self) -> Key:
        return _key_at(self.tuples, self.last_tuple)[0]

    def spool_pieces(self, **extra: Any) -> tuple[bytes, ...]:
        """The batch as a spool file, in pieces written one after another (a big batch is not
        copied into one buffer first): one JSON line (``{"batch_id": ..., "rows": ...,
        "last_tuple": ...}`` and any ``extra``), then the rows as a complete binary COPY file,
        which psql's ``\\copy`` loads into ``pixel_counts`` or ``pixel_staging`` as it is."""
        head = orjson.dumps(
            {
                "batch_id": str(self.batch_id),
                "rows": self.rows,
                "last_tuple": self.last_tuple,
                **extra,
            }
        )
        return (head, b"\n", COPY_HEADER, self.tuples, COPY_TRAILER)

    @classmethod
    def from_bytes(cls, data: bytes) -> Batch:
        """Reads a spool file's bytes: see :meth:`read`."""
        return cls.read(io.BytesIO(data), len(data))

    @classmethod
    def read(cls, file: BinaryIO, size: int) -> Batch:
        """Reads a spool file (:meth:`spool_pieces`, or those of an earlier format) of ``size``
        bytes; a ValueError for anything else, a cut-off file included. The rows are read
        straight into their own bytes object, the GIL released, and never copied: copies of
        a big batch, made with the GIL held, would stall the event loop while an outage's
        batches are read back."""
        head = file.readline()
        if not head.endswith(b"\n") and head.startswith(b"{"):
            return _from_json_rows(head)  # one JSON document, no line break
        rows_size = size - len(head) - len(COPY_HEADER) - len(COPY_TRAILER)
        copy_header = file.read(len(COPY_HEADER))
        tuples = file.read(rows_size) if rows_size >= 0 else b""
        if (
            not head.endswith(b"\n")
            or rows_size < 0
            or copy_header != COPY_HEADER
            or len(tuples) != rows_size
            or file.read() != COPY_TRAILER
        ):
            raise ValueError("not a spooled batch: a JSON line, then a binary COPY file")
        document = orjson.loads(head)
        if not isinstance(document, dict):
            raise ValueError("not a spooled batch: the first line is not a JSON object")
        rows = document.get("rows")
        if type(rows) is not int or rows < 1:
            raise ValueError(f"not a spooled batch: rows is {rows!r}")
        batch_id = uuid.UUID(str(document.get("batch_id")))
        last_tuple = document.get("last_tuple")
        if last_tuple is None:
            # Written before the buckets were timestamptz: they are unix seconds (bigint).
            return _from_rows(batch_id, _rows_with_seconds(tuples), rows)
        try:
            whole = last_copy_tuple(tuples) == last_tuple
        except ValueError as error:
            raise ValueError(f"not a spooled batch: {error}") from None
        if not whole:
            raise ValueError(f"not a spooled batch: last_tuple is {last_tuple!r}")
        return cls(batch_id, rows, tuples, last_tuple)


def _from_json_rows(data: bytes) -> Batch:
    """A spool file from before the binary format: one JSON document, ``{"batch_id": ...,
    "rows": [[bucket (unix seconds), campaign, creative, affiliate, sub_id, impressions,
    givt_impressions, measurable, viewable, clicks, givt_clicks], ...]}``."""
    try:
        document = orjson.loads(data)
        rows = document["rows"]
        batch_id = uuid.UUID(str(document["batch_id"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not a spooled batch: {type(error).__name__}: {error}") from None
    return _from_rows(batch_id, rows, None)


def _from_rows(batch_id: uuid.UUID, rows: list[Any], expected: int | None) -> Batch:
    """A spool file's rows of an earlier format (bucket in unix seconds, the dimensions, the
    counts), encoded anew by the counter engine, which checks them as it checks any count, all
    in one batch under the file's id: a batch applied before the upgrade is still applied
    once. ``expected`` is the row count the file's first line gives, if any."""
    if expected is not None and len(rows) != expected:
        raise ValueError(f"not a spooled batch: {len(rows)} tuples, {expected} rows")
    try:
        counters = Counters(max_keys=max(len(rows), 1))
        for bucket, campaign, creative, affiliate, sub_id, *counts in rows:
            if len(counts) != len(COLUMNS):
                raise ValueError(f"a row of {5 + len(counts)} values")
            for field, count in enumerate(counts):
                if count:
                    counters.add(bucket, campaign, creative, affiliate, sub_id, field, count)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"not a spooled batch: {type(error).__name__}: {error}") from None
    window = counters.swap()
    keys = len(window)
    if window.overflowed or not keys:
        raise ValueError("not a spooled batch: no counts")
    tuples = window.drain_copy(keys)
    return Batch(batch_id, keys, tuples, last_copy_tuple(tuples))


def _key_at(tuples: bytes, start: int) -> tuple[Key, int]:
    """The key of the tuple at ``start`` (its field count, the bucket's length and value, then
    each dimension's length and UTF-8), and where the key ends. A ValueError for a tuple that
    holds none."""
    try:
        fields, size, when = _KEY_HEAD.unpack_from(tuples, start)
        at = start + _KEY_HEAD.size
        dimensions = []
        for _ in range(4):
            (length,) = _INT32.unpack_from(tuples, at)
            if length < 0 or at + 4 + length > len(tuples):
                raise ValueError("a dimension is NULL or runs past the end")
            dimensions.append(tuples[at + 4 : at + 4 + length].decode())
            at += 4 + length
    except struct.error as error:
        raise ValueError(f"no key in the tuple at {start}: {error}") from None
    if fields != 11 or size != 8:
        raise ValueError(f"no key in the tuple at {start}: {fields} fields, bucket of {size}")
    campaign, creative, affiliate, sub_id = dimensions
    return (when, campaign, creative, affiliate, sub_id), at


def _rows_with_seconds(tuples: bytes) -> list[Any]:
    """The rows of COPY tuples whose bucket is a bigint (unix seconds): each its key, then its
    six counts."""
    rows: list[Any] = []
    at = 0
    while at < len(tuples):
        try:
            key, at = _key_at(tuples, at)
            values = _COUNTS.unpack_from(tuples, at)
        except (ValueError, struct.error) as error:
            raise ValueError(f"not a spooled batch: {error}") from None
        if values[::2] != (8,) * len(COLUMNS):
            raise ValueError(f"not a spooled batch: a count is not a bigint at {at}")
        rows.append((*key, *values[1::2]))
        at += _COUNTS.size
    return rows


def seal_window(window: Window, add: Callable[[Batch], object]) -> tuple[int, ...]:
    """Drains a swapped-out window into batches of up to :data:`BATCH_ROWS` rows, passing each
    to ``add`` as soon as it is made; returns the window's per-field totals. Blocking: the
    engine sorts and encodes without the GIL, so call it from a worker thread."""
    totals = window.totals
    while left := len(window):
        tuples = window.drain_copy(BATCH_ROWS)
        add(Batch(uuid.uuid4(), left - len(window), tuples, last_copy_tuple(tuples)))
    return totals


async def seal(window: Window, add: Callable[[Batch], object], events: list[int]) -> None:
    """Seals a window off the event loop, passes each batch to ``add`` on the event loop as soon
    as it is made (so the database can start on the first while the rest are encoded), and
    adds the window's per-field totals to ``events``. If cancelled, it waits for the sealing
    thread, or drains the window itself, before it stops: no row is lost. If the sealing
    fails, the batches sealed before the error are handed over all the same."""
    loop = asyncio.get_running_loop()
    made: collections.deque[Batch] = collections.deque()

    def hand_over() -> None:
        while made:
            add(made[0])  # a batch leaves the deque once add() has it
            made.popleft()

    def sealed(batch: Batch) -> None:  # in the sealing thread
        made.append(batch)
        loop.call_soon_threadsafe(hand_over)

    # The sealing thread runs at the event loop's own priority, never below it: it takes the
    # GIL now and then, and a thread of the least priority (nice 19) that holds the GIL, or
    # that the loop must hand it to, may not run again for tens of milliseconds on a busy
    # core, while the loop waits for it (README: "the rare stalls were the GIL"). The long work,
    # sorting and encoding, runs in the engine on a thread of low priority (nice 10) that never
    # takes the GIL, so on a core it shares with the loop the loop runs first.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seal") as executor:
        sealing = executor.submit(seal_window, window, sealed)
        try:
            totals = await asyncio.wrap_future(sealing)
        except asyncio.CancelledError:
            # The thread could not be stopped (it ran on) or never started (the window is
            # still whole); either way every row ends up in a batch.
            totals = seal_window(window, made.append) if sealing.cancelled() else sealing.result()
            _add_totals(events, totals)
            raise
        finally:
            hand_over()
    _add_totals(events, totals)


def _add_totals(events: list[int], totals: tuple[int, ...]) -> None:
    for field, total in enumerate(totals):
        events[field] += total
