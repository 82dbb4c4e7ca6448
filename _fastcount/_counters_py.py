"""Pure-Python counter engine: the reference the compiled one must match.

Used where the extension is not built (FASTCOUNT_NO_EXTENSIONS, or no
compiler) and by the tests, which run every case against both. One dict per
window: the shards of the compiled engine exist to keep its table resizes short
and are not observable, so here `shards` is only validated. A Window sorts its
keys as tuples: str compare by code point, the same order as the compiled
engine's comparison of UTF-8 bytes.
"""

from __future__ import annotations

import operator
import re
import struct
import threading
from collections.abc import Callable
from typing import Final, NoReturn, SupportsIndex, TypeVar, final

__all__ = (
    "CLICKS",
    "COLUMNS",
    "GIVT_CLICKS",
    "GIVT_IMPRESSIONS",
    "IMPRESSIONS",
    "MEASURABLE",
    "OVERFLOW_CAMPAIGN",
    "QUERY_PARAMETERS",
    "VIEWABLE",
    "Counters",
    "Window",
    "last_copy_tuple",
)

IMPRESSIONS: Final = 0
GIVT_IMPRESSIONS: Final = 1
MEASURABLE: Final = 2
VIEWABLE: Final = 3
CLICKS: Final = 4
GIVT_CLICKS: Final = 5
COLUMNS: Final = (
    "impressions",
    "givt_impressions",
    "measurable",
    "viewable",
    "clicks",
    "givt_clicks",
)
OVERFLOW_CAMPAIGN: Final = "__overflow__"
# The query parameters of the four dimensions, in key order.
QUERY_PARAMETERS: Final = ("cid", "crid", "aff", "sub")
_QUERY_DIMENSIONS: Final = {
    name.encode(): position for position, name in enumerate(QUERY_PARAMETERS)
}
# Printable ASCII but "%" and "+": a value of such bytes is its own text.
_PLAIN: Final = re.compile(rb"[!-$&-*,-~]*").fullmatch

_NFIELDS: Final = len(COLUMNS)
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_MAX_SHARDS: Final = 1 << 16
_MAX_DIMENSION_BYTES: Final = 2**31 - 1  # COPY's field length is an int32
_PG_EPOCH: Final = 946_684_800  # 2000-01-01 00:00:00 UTC in unix seconds
# The buckets timestamptz holds, in unix seconds: 4714-11-24 00:00:00 BC to
# 294276-12-31 23:59:59 UTC (PostgreSQL's MIN_TIMESTAMP and END_TIMESTAMP).
_FIRST_BUCKET: Final = -210_866_803_200
_LAST_BUCKET: Final = 9_224_318_015_999

_Key = tuple[int, str, str, str, str]
_Row = tuple[int, str, str, str, str, int, int, int, int, int, int]
_Totals = tuple[int, int, int, int, int, int]
_T = TypeVar("_T")

# PostgreSQL's binary COPY tuple, big-endian: the field count, then each field
# as an int32 length and its bytes. A dimension's length is packed unsigned, as
# the compiled engine writes its uint32 lengths: the same bytes for any length
# the engines take (under 2**31).
_COPY_FIELDS: Final = 1 + 4 + _NFIELDS  # bucket, the four dimensions, the counts
_COPY_BUCKET: Final = struct.Struct(">hiq")  # field count, length 8, bucket
_COPY_LENGTH: Final = struct.Struct(">I")
_COPY_FIELD_COUNT: Final = struct.Struct(">h")
_COPY_FIELD_LENGTH: Final = struct.Struct(">i")
_COPY_COUNTS: Final = struct.Struct(">" + "iq" * _NFIELDS)  # length 8, count; per field


def _int64(value: SupportsIndex, c_type: str = "long") -> int:
    """What the compiled module's PyLong_AsLongLong (or, for a ``c_type`` of "ssize_t", its
    Py_ssize_t conversion) accepts: __index__, int64 range, with its OverflowError."""
    number = operator.index(value)
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise OverflowError(f"Python int too large to convert to C {c_type}")
    return number


def _check_dimensions(*dimensions: object) -> None:
    names = ("campaign", "creative", "affiliate", "sub_id")
    for name, value in zip(names, dimensions, strict=True):
        if type(value) is not str:
            raise TypeError(
                f"Argument '{name}' has incorrect type (expected str, got {type(value).__name__})"
            )


@final
class Counters:
    """Counts of the current window, per (bucket, campaign, creative, affiliate, sub_id).

    A window holds at most max_keys keys, overflow rows aside; past that, counts
    for new keys go to their bucket's overflow row. shards (a power of two up to
    65536) splits the table so that each resize is short; it changes nothing
    else.
    """

    __slots__ = ("_keys", "_max_keys", "_overflow_rows", "_overflowed", "_rows")

    def __init_subclass__(cls, **kwargs: object) -> NoReturn:
        # As the compiled classes (cython.final) do.
        raise TypeError(f"type '{cls.__mro__[1].__qualname__}' is not an acceptable base type")

    def __init__(self, max_keys: int = 1_000_000, shards: int = 16) -> None:
        max_keys_ = _int64(max_keys)
        shards_ = _int64(shards)
        if max_keys_ < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        if shards_ < 1 or shards_ > _MAX_SHARDS or shards_ & (shards_ - 1):
            raise ValueError(f"shards must be a power of two from 1 to {_MAX_SHARDS}, got {shards}")
        self._max_keys = max_keys_
        self._rows: dict[_Key, list[int]] = {}
        self._keys = 0  # distinct keys other than overflow rows
        self._overflow_rows = 0
        self._overflowed = 0

    def add(
        self,
        bucket: int,
        campaign: str,
        creative: str,
        affiliate: str,
        sub_id: str,
        field: int,
        n: int = 1,
    ) -> None:
        """Adds n (>= 1) to one field, IMPRESSIONS to GIVT_CLICKS, of the key's row.

        bucket is the unix time of the bucket start. A dimension that is not a
        str is a TypeError; a field or n out of range, or a bucket PostgreSQL's
        timestamptz cannot hold (before 4714 BC, after 294276), a ValueError; an
        integer or a count past int64 an OverflowError.
        """
        if not (
            type(campaign) is str
            and type(creative) is str
            and type(affiliate) is str
            and type(sub_id) is str
            and type(bucket) is int
            and type(field) is int
            and type(n) is int
            and 0 <= field < _NFIELDS
            and 1 <= n <= _INT64_MAX
        ):
            # Same checks, same order, same errors as the compiled add().
            _check_dimensions(campaign, creative, affiliate, sub_id)
            bucket = _int64(bucket)
            field_ = _int64(field)
            n_ = _int64(n)
            if not 0 <= field_ < _NFIELDS:
                raise ValueError(f"field must be 0..{_NFIELDS - 1}, got {field}")
            if n_ < 1:
                raise ValueError(f"n must be >= 1, got {n}")
            field, n = field_, n_
        key = (bucket, campaign, creative, affiliate, sub_id)
        row = self._rows.get(key)
        if row is None:
            self._add_new(key, field, n)
        elif row[field] > _INT64_MAX - n:
            raise OverflowError("counter would exceed 2**63 - 1")
        else:
            row[field] += n

    def add_query(
        self, bucket: int, data: bytes, start: int, end: int, field: int, max_value_bytes: int
    ) -> bool:
        """Adds 1 to one field of the row named by the raw query string
        data[start:end], and returns True, when that query is plain. Returns
        False, counting nothing, for any other query, which the caller then
        parses in full.

        Plain: every parameter name, and every value of a dimension's
        parameter (QUERY_PARAMETERS), is printable ASCII but "%" and "+", no
        dimension's parameter comes twice, and none of their values is longer
        than max_value_bytes. Parameters are split at "&", a name from its
        value at the first "="; a missing dimension is "", other parameters
        are ignored.
        """
        # Same checks, same order, same errors as the compiled add_query().
        if type(data) is not bytes:
            raise TypeError(
                f"Argument 'data' has incorrect type (expected bytes, got {type(data).__name__})"
            )
        start, end, max_value_bytes = (_int64(x, "ssize_t") for x in (start, end, max_value_bytes))
        bucket = _int64(bucket)
        field_ = _int64(field)
        if not 0 <= field_ < _NFIELDS:
            raise ValueError(f"field must be 0..{_NFIELDS - 1}, got {field}")
        if not 0 <= start <= end <= len(data):
            raise ValueError(f"not a slice of data: {start}:{end} of {len(data)} bytes")
        values: list[str] = ["", "", "", ""]
        seen = 0
        for pair in data[start:end].split(b"&"):
            name, _, value = pair.partition(b"=")
            if not _PLAIN(name):
                return False
            position = _QUERY_DIMENSIONS.get(name)
            if position is None:
                continue
            if seen & (1 << position) or len(value) > max_value_bytes or not _PLAIN(value):
                return False
            seen |= 1 << position
            values[position] = value.decode("ascii")
        campaign, creative, affiliate, sub_id = values
        self.add(bucket, campaign, creative, affiliate, sub_id, field_)
        return True

    def _add_new(self, key: _Key, field: int, n: int) -> None:
        # Only keys that got in through here are stored, so an existing key
        # needs none of these checks again.
        bucket, *dimensions = key
        if not _INT64_MIN <= bucket <= _INT64_MAX:
            raise OverflowError("Python int too large to convert to C long")
        encoded = [dimension.encode() for dimension in dimensions]  # UnicodeEncodeError
        if not _FIRST_BUCKET <= bucket <= _LAST_BUCKET:
            raise ValueError(f"bucket {bucket} is past what PostgreSQL's timestamptz holds")
        if key[1:] == (OVERFLOW_CAMPAIGN, "", "", ""):
            self._rows[key] = self._new_row(field, n)
            self._overflow_rows += 1
            return
        if self._keys < self._max_keys:
            if any(len(value) > _MAX_DIMENSION_BYTES for value in encoded):
                raise ValueError("a dimension is longer than 2**31 - 1 bytes of UTF-8")
            self._rows[key] = self._new_row(field, n)
            self._keys += 1
            return
        # The window is full: count into the bucket's overflow row instead.
        if self._overflowed > _INT64_MAX - n:
            raise OverflowError("overflowed would exceed 2**63 - 1")
        overflow_key = (bucket, OVERFLOW_CAMPAIGN, "", "", "")
        row = self._rows.get(overflow_key)
        if row is None:
            self._rows[overflow_key] = self._new_row(field, n)
            self._overflow_rows += 1
        elif row[field] > _INT64_MAX - n:
            raise OverflowError("counter would exceed 2**63 - 1")
        else:
            row[field] += n
        self._overflowed += n

    @staticmethod
    def _new_row(field: int, n: int) -> list[int]:
        row = [0] * _NFIELDS
        row[field] = n
        return row

    def swap(self) -> Window:
        """Hands the window counted so far to a Window and starts an empty one.

        Constant time in the number of keys; counting goes on at once.
        """
        window = Window._of(self._rows, self._overflowed)
        self._rows = {}
        self._keys = 0
        self._overflow_rows = 0
        self._overflowed = 0
        return window

    def __len__(self) -> int:
        return self._keys + self._overflow_rows

    @property
    def overflowed(self) -> int:
        return self._overflowed

    @property
    def max_keys(self) -> int:
        return self._max_keys


@final
class Window:
    """The counts of a window swapped out of a Counters, drained in batches.

    A Window shares nothing with its Counters: drain it from any thread. Rows
    come out in key order: ascending bucket, then campaign, creative,
    affiliate and sub_id compared as UTF-8 bytes, which is PostgreSQL's order
    for the primary key with COLLATE "C". The first drain (or totals) sorts
    the whole window.
    """

    __slots__ = ("_lock", "_order", "_overflowed", "_rows", "_totals")

    _rows: dict[_Key, list[int]]
    _overflowed: int
    _lock: threading.Lock
    _order: list[_Key]  # keys not yet drained, descending (taken from the end), once gathered
    _totals: _Totals | None  # None until gathered

    def __init_subclass__(cls, **kwargs: object) -> NoReturn:
        # As the compiled classes (cython.final) do.
        raise TypeError(f"type '{cls.__mro__[1].__qualname__}' is not an acceptable base type")

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError("Window objects are made by Counters.swap()")

    @classmethod
    def _of(cls, rows: dict[_Key, list[int]], overflowed: int) -> Window:
        window = cls.__new__(cls)
        window._rows = rows
        window._overflowed = overflowed
        window._lock = threading.Lock()
        window._order = []
        window._totals = None
        return window

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def overflowed(self) -> int:
        return self._overflowed

    @property
    def totals(self) -> _Totals:
        """Per-field sums, in COLUMNS order, over every row the window was
        swapped out with, drained or not. Exact: a sum may pass int64."""
        self._lock.acquire()
        try:
            return self._gather()
        finally:
            self._lock.release()

    def drain(self, limit: int) -> list[_Row]:
        """Removes and returns up to limit (>= 1) rows, in key order; [] once empty.

        A row is (bucket, campaign, creative, affiliate, sub_id, impressions,
        givt_impressions, measurable, viewable, clicks, givt_clicks). Drained
        rows free their memory.
        """
        return self._drain(limit, _rows_of)

    def drain_copy(self, limit: int) -> bytes:
        """Removes up to limit (>= 1) rows, in key order, and returns them as the
        tuples of PostgreSQL's binary COPY format; b"" once empty.

        The bytes hold no file header or trailer. Each tuple has 11 fields:
        the bucket (timestamptz: microseconds since 2000-01-01 UTC), the four
        dimensions (text as UTF-8; an empty one is empty, never NULL), the six
        counts (bigint), in COLUMNS order: the columns of pixel_counts.
        drain() and drain_copy() take from the same rows. Drained rows free
        their memory.
        """
        return self._drain(limit, _copy_of)

    # As in the compiled engine: drains from several threads get disjoint rows
    # (the lock), and a MemoryError loses none. Every step that allocates comes
    # before the first one that removes anything (_remove); removing from a
    # list's tail or from a dict allocates nothing. The lock is released by
    # release(), not by a with block: the lock's __exit__ takes its arguments
    # as a tuple, and were that tuple's allocation to fail, the lock would stay
    # held and the next drain would wait for it forever.

    def _drain(self, limit: int, build: Callable[[list[_Key], dict[_Key, list[int]]], _T]) -> _T:
        """Builds the next rows, up to limit, with ``build``; then removes them."""
        limit_ = _int64(limit)
        if limit_ < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._lock.acquire()
        try:
            keys = self._next_keys(limit_)
            built = build(keys, self._rows)
            self._remove(keys)
            return built
        finally:
            self._lock.release()

    def _gather(self) -> _Totals:
        """Sorts the keys into _order and sums the rows up; once, before the
        first row is drained. Called with the lock held."""
        if self._totals is None:
            rows = self._rows
            a, b, c, d, e, f = [
                sum(map(operator.itemgetter(field), rows.values())) for field in range(_NFIELDS)
            ]
            totals = (a, b, c, d, e, f)
            self._order = sorted(rows, reverse=True)
            self._totals = totals
        return self._totals

    def _next_keys(self, limit: int) -> list[_Key]:
        """The next keys in key order, up to limit; still in the window."""
        self._gather()
        order = self._order
        keys = order[max(len(order) - limit, 0) :]
        keys.reverse()
        return keys

    def _remove(self, keys: list[_Key]) -> None:
        """Removes the keys _next_keys() gave, once their rows are built."""
        order = self._order
        rows = self._rows
        removed = iter(keys)  # an allocation too: made before the first removal
        del order[len(order) - len(keys) :]
        for key in removed:
            del rows[key]
        if not rows:
            rows.clear()  # gives the table back


def _rows_of(keys: list[_Key], rows: dict[_Key, list[int]]) -> list[_Row]:
    drained: list[_Row] = []
    for key in keys:
        bucket, campaign, creative, affiliate, sub_id = key
        a, b, c, d, e, f = rows[key]
        drained.append((bucket, campaign, creative, affiliate, sub_id, a, b, c, d, e, f))
    return drained


def last_copy_tuple(tuples: bytes) -> int:
    """Where the last of these binary COPY tuples starts (each a 16-bit field
    count, then each field as a 32-bit length and its bytes; big-endian). A
    ValueError unless there is one at least, each has the 11 fields of
    pixel_counts, none NULL, and the last ends where the bytes do."""
    if type(tuples) is not bytes:
        raise TypeError(
            f"Argument 'tuples' has incorrect type (expected bytes, got {type(tuples).__name__})"
        )
    at, last = 0, -1
    try:
        while at < len(tuples):
            last = at
            (fields,) = _COPY_FIELD_COUNT.unpack_from(tuples, at)
            if fields != _COPY_FIELDS:
                at = -1
                break
            at += 2
            for _ in range(fields):
                (length,) = _COPY_FIELD_LENGTH.unpack_from(tuples, at)
                if length < 0 or len(tuples) - at - 4 < length:
                    at = -1
                    break
                at += 4 + length
            if at < 0:
                break
    except struct.error:
        at = -1
    if last < 0 or at != len(tuples):
        raise ValueError("not binary COPY tuples of pixel_counts, or the last one is cut short")
    return last


def _pg_timestamp(seconds: int) -> int:
    """Unix seconds, from _FIRST_BUCKET to _LAST_BUCKET (no row holds others), as
    PostgreSQL's timestamptz: microseconds since its epoch."""
    return (seconds - _PG_EPOCH) * 1_000_000


def _copy_of(keys: list[_Key], rows: dict[_Key, list[int]]) -> bytes:
    parts: list[bytes] = []
    for key in keys:
        bucket, *dimensions = key
        parts.append(_COPY_BUCKET.pack(_COPY_FIELDS, 8, _pg_timestamp(bucket)))
        for dimension in dimensions:
            encoded = dimension.encode()
            parts.append(_COPY_LENGTH.pack(len(encoded)))
            parts.append(encoded)
        a, b, c, d, e, f = rows[key]
        parts.append(_COPY_COUNTS.pack(8, a, 8, b, 8, c, 8, d, 8, e, 8, f))
    return b"".join(parts)
