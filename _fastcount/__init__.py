"""In-memory impression counters, swapped out whole for each flush.

The pixel handlers count into a :class:`Counters` on the event loop thread; the
flusher calls :meth:`Counters.swap`, which hands the window counted so far to a
:class:`Window` in constant time, and drains that window in batches (from a
worker thread if it likes: the two share nothing) while counting goes on::

    >>> from _fastcount import Counters, IMPRESSIONS, VIEWABLE
    >>> counters = Counters(max_keys=1_000_000)
    >>> bucket = 1_700_000_000  # unix seconds of the bucket start
    >>> counters.add(bucket, "summer-sale", "banner-300x250", "aff-17", "", IMPRESSIONS)
    >>> counters.add(bucket, "summer-sale", "banner-300x250", "aff-17", "", VIEWABLE, 2)
    >>> window = counters.swap()
    >>> len(counters), len(window)
    (0, 1)
    >>> window.drain(5_000)
    [(1700000000, 'summer-sale', 'banner-300x250', 'aff-17', '', 1, 0, 0, 2, 0, 0)]
    >>> window.drain(5_000)
    []

A row is keyed by (bucket, campaign, creative, affiliate, sub_id) and holds one
count per field of :data:`COLUMNS`, in that order; ``IMPRESSIONS`` to
``GIVT_CLICKS`` are the field indexes. Once a window holds ``max_keys`` keys,
counts for new keys go to that bucket's row ``(bucket, OVERFLOW_CAMPAIGN, "",
"", "")`` and are added up in ``overflowed``: memory stays bounded whatever the
query strings hold, and no count is dropped.

Two implementations with the same behaviour: the compiled ``_counters_c``
(C hash tables, no allocation to count an existing key) and the pure-Python
``_counters_py``. The compiled one is used unless the environment variable
``FASTCOUNT_NO_EXTENSIONS`` is non-empty, or it cannot be imported (not built).
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
    "VIEWABLE",
    "Counters",
    "Window",
)

NO_EXTENSIONS = bool(os.environ.get("FASTCOUNT_NO_EXTENSIONS"))
if sys.implementation.name != "cpython":
    NO_EXTENSIONS = True

if TYPE_CHECKING or NO_EXTENSIONS:
    from . import _counters_py as _engine
else:
    try:
        from . import _counters_c as _engine
    except ImportError:  # not built: see setup.py
        from . import _counters_py as _engine

CLICKS = _engine.CLICKS
COLUMNS = _engine.COLUMNS
GIVT_CLICKS = _engine.GIVT_CLICKS
GIVT_IMPRESSIONS = _engine.GIVT_IMPRESSIONS
IMPRESSIONS = _engine.IMPRESSIONS
MEASURABLE = _engine.MEASURABLE
OVERFLOW_CAMPAIGN = _engine.OVERFLOW_CAMPAIGN
VIEWABLE = _engine.VIEWABLE
Counters = _engine.Counters
Window = _engine.Window
