"""The pixel endpoint: the 43-byte GIF, answered at once, and the count behind it."""

from __future__ import annotations

import time

from aiohttp import web

from _fastcount import GIVT_IMPRESSIONS, IMPRESSIONS
from server import givt
from server.app_keys import CONFIG, COUNTERS, METRICS
from server.query import MAX_VALUE_BYTES, Dimensions, Rejected, parse_dimensions

# The smallest transparent GIF89a: 1x1, one transparent colour.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00"
    b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)

PIXEL_HEADERS = {
    "Content-Type": "image/gif",
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "Expires": "0",
    "X-Content-Type-Options": "nosniff",
}


def gif_response() -> web.Response:
    return web.Response(body=GIF, headers=PIXEL_HEADERS)


def raw_query(request: web.Request) -> bytes:
    """The query string exactly as received, before any decoding; up to a fragment (``#``),
    which is no part of it (RFC 3986) and which browsers never send."""
    query = request.raw_path.partition("?")[2].partition("#")[0]
    return query.encode("utf-8", "surrogateescape")


def reject(request: web.Request, rejected: Rejected) -> None:
    """Counts a request answered but not counted, by reason."""
    request.app[METRICS].rejected[rejected.reason] += 1


def record(
    request: web.Request, dimensions: Dimensions, human_field: int, givt_field: int | None
) -> None:
    """Adds one event of the request to the current bucket: to the GIVT field for bots and
    prefetches, or, for an event with no GIVT field (``None``), only to the ``givt`` metric."""
    app = request.app
    reason = givt.classify(request.headers)
    if reason is None:
        field = human_field
    else:
        app[METRICS].givt[reason] += 1
        if givt_field is None:
            return
        field = givt_field
    app[COUNTERS].add(current_bucket(app), *dimensions, field)


def current_bucket(app: web.Application, now: float | None = None) -> int:
    """The unix time the bucket of ``now`` (by default, the current time) started."""
    width = app[CONFIG].bucket_seconds
    second = int(time.time() if now is None else now)
    return second - second % width


def count(request: web.Request, human_field: int, givt_field: int) -> None:
    """Counts one event of a GET request, or its rejection reason; never raises for bad input."""
    app, query = request.app, raw_query(request)
    reason = givt.classify(request.headers)
    count_query(app, current_bucket(app), query, 0, len(query), reason, human_field, givt_field)


def count_query(
    app: web.Application,
    bucket: int,
    data: bytes,
    start: int,
    end: int,
    givt_reason: str | None,
    human_field: int,
    givt_field: int,
) -> None:
    """Counts one event from the raw query string ``data[start:end]`` in ``bucket``: to
    ``givt_field`` when the request has a GIVT reason (:func:`server.givt.classify`), else to
    ``human_field``. The counter engine takes a plain query as it is; any other is parsed
    here."""
    counters = app[COUNTERS]
    field = human_field if givt_reason is None else givt_field
    if not counters.add_query(bucket, data, start, end, field, MAX_VALUE_BYTES):
        try:
            dimensions = parse_dimensions(data[start:end])
        except Rejected as rejected:
            app[METRICS].rejected[rejected.reason] += 1
            return
        counters.add(bucket, *dimensions, field)
    if givt_reason is not None:
        app[METRICS].givt[givt_reason] += 1


async def impression(request: web.Request) -> web.Response:
    """``GET /i.gif``: one impression. ``HEAD`` gets the same answer and counts nothing."""
    request.app[METRICS].requests["/i.gif"] += 1
    if request.method == "GET":
        count(request, IMPRESSIONS, GIVT_IMPRESSIONS)
    return gif_response()
