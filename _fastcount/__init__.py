"""In-memory impression counters, swapped out whole for each flush.

The pixel handlers count into a :class:`Counters` on the event loop thread; the
flusher calls :meth:`Counters.swap`, which hands the window counted so far to a
:class:`Window` in constant time, and drains that window in batches (from a
worker thread if it likes: the two share nothing) while counting goes on::

    >>> from _fastcount import CLICKS, IMPRESSIONS, VIEWABLE, Counters
    >>> counters = Counters(max_keys=1_000_000)
    >>> bucket = 1_700_000_000  # unix seconds of the bucket start
    >>> counters.add(bucket, "summer-sale", "banner-300x250", "aff-17", "", IMPRESSIONS)
    >>> counters.add(bucket, "summer-sale", "banner-300x250", "aff-17", "", VIEWABLE, 2)
    >>> counters.add(bucket, "spring-sale", "banner-728x90", "aff-17", "", CLICKS)
    >>> window = counters.swap()
    >>> len(counters), len(window)
    (0, 2)
    >>> window.totals
    (1, 0, 0, 2, 1, 0)
    >>> window.drain(1)
    [(1700000000, 'spring-sale', 'banner-728x90', 'aff-17', '', 0, 0, 0, 0, 1, 0)]
    >>> window.drain(5_000)
    [(1700000000, 'summer-sale', 'banner-300x250', 'aff-17', '', 1, 0, 0, 2, 0, 0)]
    >>> window.drain(5_000)
    []

Rows come out in key order: ascending bucket, then campaign, creative,
affiliate and sub_id compared as UTF-8 bytes. That is PostgreSQL's order for the
primary key with ``COLLATE "C"``: concurrent writers lock rows in one order, and
index inserts go in index order. The first drain, or ``totals``, sorts the whole
window (the compiled engine without holding the GIL, on a thread of low
priority that it makes for the work on Linux, as it does to encode
``drain_copy``'s tuples; the calling thread waits for it). ``totals`` sums each field
over every row the window was swapped out with, drained or not.
:meth:`Window.drain_copy` takes the same rows already encoded as the tuples of
PostgreSQL's binary COPY format, to send after its file header::

    >>> import struct
    >>> counters.add(bucket, "summer-sale", "", "", "", CLICKS)
    >>> copy = counters.swap().drain_copy(5_000)
    >>> fields, size, when = struct.unpack_from(">hiq", copy)  # the first field: the bucket
    >>> fields, size, when == (bucket - 946_684_800) * 1_000_000  # as a timestamptz
    (11, 8, True)
    >>> len(copy)
    113

A row is keyed by (bucket, campaign, creative, affiliate, sub_id) and holds one
count per field of :data:`COLUMNS`, in that order; ``IMPRESSIONS`` to
``GIVT_CLICKS`` are the field indexes. Once a window holds ``max_keys`` keys,
counts for new keys go to that bucket's row ``(bucket, OVERFLOW_CAMPAIGN, "",
"", "")`` and are added up in ``overflowed``: memory stays bounded whatever the
query strings hold, and no count is dropped.

A server can count a pixel request from the bytes it received, with no Python
object made per parameter: :class:`GetScanner` finds a complete request of the
one simple shape, a keep-alive ``GET`` or ``HEAD`` of the pixel's path, in those bytes, and
:meth:`Counters.add_query` counts its query string when it is plain::

    >>> scanner = GetScanner(b"/i.gif", max_line_size=4096, max_field_size=8190)
    >>> data = (
    ...     b"GET /i.gif?cid=summer-sale&cb=17 HTTP/1.1\\r\\n"
    ...     b"Host: t.example\\r\\nUser-Agent: Mozilla/5.0\\r\\n\\r\\n"
    ... )
    >>> end, head_only, query_start, query_end, user_agent = scanner.scan(data, 0)
    >>> end == len(data), head_only, data[query_start:query_end], user_agent
    (True, False, b'cid=summer-sale&cb=17', 'Mozilla/5.0')
    >>> counters.add_query(bucket, data, query_start, query_end, IMPRESSIONS, 128)
    True
    >>> counters.swap().drain(1)
    [(1700000000, 'summer-sale', '', '', '', 1, 0, 0, 0, 0, 0)]

Two implementations of each, with the same behaviour: the compiled
``_counters_c`` (C hash tables, no allocation to count an existing key) and
``_http_c``, and the pure-Python ``_counters_py`` and ``_http_py``. The compiled
ones are used unless the environment variable ``FASTCOUNT_NO_EXTENSIONS`` is
non-empty, or they cannot be imported (not built).
"""

import os
import sys
from typing import TYPE_CHECKING

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
    "GetScanner",
    "Window",
    "last_copy_tuple",
)

NO_EXTENSIONS = bool(os.environ.get("FASTCOUNT_NO_EXTENSIONS"))
if sys.implementation.name != "cpython":
    NO_EXTENSIONS = True

if TYPE_CHECKING or NO_EXTENSIONS:
    from . import _counters_py as _engine
    from . import _http_py as _http
else:
    try:
        from . import _counters_c as _engine
        from . import _http_c as _http
    except ImportError:  # not built: see setup.py
        from . import _counters_py as _engine
        from . import _http_py as _http

CLICKS = _engine.CLICKS
COLUMNS = _engine.COLUMNS
GIVT_CLICKS = _engine.GIVT_CLICKS
GIVT_IMPRESSIONS = _engine.GIVT_IMPRESSIONS
IMPRESSIONS = _engine.IMPRESSIONS
MEASURABLE = _engine.MEASURABLE
OVERFLOW_CAMPAIGN = _engine.OVERFLOW_CAMPAIGN
QUERY_PARAMETERS = _engine.QUERY_PARAMETERS
VIEWABLE = _engine.VIEWABLE
Counters = _engine.Counters
Window = _engine.Window
GetScanner = _http.GetScanner
last_copy_tuple = _engine.last_copy_tuple
