"""The pixel endpoint: the 43-byte GIF, answered at once, and the count behind it."""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiohttp import web

from _fastcount import GIVT_IMPRESSIONS, IMPRESSIONS
from server import givt
from server.app_keys import CONFIG, COUNTERS, METRICS
from server.query import Dimensions, Rejected, parse_dimensions

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
    """The query string exactly as received, before any decoding."""
    return request.raw_path.partition("?")[2].encode("utf-8", "surrogateescape")


def reject(request: web.Request, rejected: Rejected) -> None:
    """Counts a request answered but not counted, by reason."""
    request.app[METRICS].rejected[rejected.reason] += 1


def record(
    request: web.Request, dimensions: Dimensions, human_field: int, givt_field: int | None
) -> None:
    """Adds one event of the request to the current bucket (see :func:`record_event`)."""
    record_event(request.app, request.headers, dimensions, human_field, givt_field)


def record_event(
    app: web.Application,
    headers: Mapping[str, str],
    dimensions: Dimensions,
    human_field: int,
    givt_field: int | None,
) -> None:
    """Adds one event to the current bucket: to the GIVT field for bots and prefetches, or,
    for an event with no GIVT field (``None``), only to the ``givt`` metric."""
    reason = givt.classify(headers)
    if reason is None:
        field = human_field
    else:
        app[METRICS].givt[reason] += 1
        if givt_field is None:
            return
        field = givt_field
    width = app[CONFIG].bucket_seconds
    now = int(time.time())
    app[COUNTERS].add(now - now % width, *dimensions, field)


def count(request: web.Request, human_field: int, givt_field: int) -> None:
    """Counts one event of a GET request, or its rejection reason; never raises for bad input."""
    count_query(request.app, raw_query(request), request.headers, human_field, givt_field)


def count_query(
    app: web.Application,
    query: bytes,
    headers: Mapping[str, str],
    human_field: int,
    givt_field: int,
) -> None:
    """Counts one event from the raw query string and the headers of a request."""
    try:
        dimensions = parse_dimensions(query)
    except Rejected as rejected:
        app[METRICS].rejected[rejected.reason] += 1
        return
    record_event(app, headers, dimensions, human_field, givt_field)


async def impression(request: web.Request) -> web.Response:
    """``GET /i.gif``: one impression. ``HEAD`` gets the same answer and counts nothing."""
    request.app[METRICS].requests["/i.gif"] += 1
    if request.method == "GET":
        count(request, IMPRESSIONS, GIVT_IMPRESSIONS)
    return gif_response()
