"""Viewability: the ``/v.gif`` events the browser sends, and the ``/v.js`` script that sends them.

The script (``server/static/v.js``) measures a creative by the IAB/MRC rule and sends
``/v.gif?e=m`` once when it can measure and ``/v.gif?e=v`` once when the rule is met, by
``navigator.sendBeacon`` (POST, answered 204) or, failing that, an image (GET, the GIF).
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

from aiohttp import web

from _fastcount import MEASURABLE, VIEWABLE
from server.app_keys import METRICS
from server.pixel import PIXEL_HEADERS, gif_response, raw_query, record, reject
from server.query import REPEATED_PARAMETER, Rejected, parse_dimensions

# The reasons, as counted in the `rejected` metric.
MISSING_EVENT = "missing_event"
UNKNOWN_EVENT = "unknown_event"

EVENTS = {b"m": MEASURABLE, b"v": VIEWABLE}

# A beacon carries everything in its query string; its body, if any, is never read. A body
# that came whole and no larger than this is dropped and the connection kept; any other is
# answered with ``Connection: close``: see ``event``.
MAX_IGNORED_BODY = 1024

# The 204 to a beacon: the pixel's no-cache headers, without the image's.
BEACON_HEADERS = {name: value for name, value in PIXEL_HEADERS.items() if name != "Content-Type"}


def parse_event(query: bytes) -> int:
    """The counter field of the ``e`` parameter of a raw query string.

    >>> parse_event(b"e=v&cid=spring") == VIEWABLE
    True

    Raises :class:`Rejected`: ``missing_event``, ``unknown_event`` or ``repeated_parameter``.
    """
    found: bytes | None = None
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"e":
            if found is not None:
                raise Rejected(REPEATED_PARAMETER)
            found = value
    if not found:
        raise Rejected(MISSING_EVENT)
    field = EVENTS.get(found)
    if field is None:
        raise Rejected(UNKNOWN_EVENT)
    return field


def count_event(request: web.Request) -> None:
    """Counts one measurable or viewable event, or its rejection reason."""
    query = raw_query(request)
    try:
        field = parse_event(query)
        dimensions = parse_dimensions(query)
    except Rejected as rejected:
        reject(request, rejected)
        return
    # GIVT (bots, prefetch) is counted in the `givt` metric only: pixel_counts has no GIVT
    # column for measurable or viewable, and these must never count as human events.
    record(request, dimensions, field, None)


async def event(request: web.Request) -> web.Response:
    """``GET``/``POST /v.gif?e=m|v``: one measurable or viewable event. ``HEAD`` counts nothing.

    A POST (``navigator.sendBeacon``) is answered 204, its body never read: aiohttp would
    otherwise read and discard it for up to its lingering time, so a large body could cost
    far more than a GET. The runner sets ``lingering_time=0``, which closes a connection whose
    body is still unread; the ``Connection: close`` here says so to the client.
    """
    request.app[METRICS].requests["/v.gif"] += 1
    if request.method != "HEAD":
        count_event(request)
    if request.method != "POST":
        return gif_response()
    response = web.Response(status=204, headers=BEACON_HEADERS)
    if not request.content.is_eof() or (request.content_length or 0) > MAX_IGNORED_BODY:
        response.force_close()
    return response


async def do_not_continue(request: web.Request) -> None:
    """``Expect: 100-continue`` is not answered: the body is not wanted."""


def compact(source: str) -> str:
    """The script as served: comment lines, indentation and blank lines removed.

    Safe for ``v.js`` as written (no block comments, template literals or multi-line strings),
    and line breaks are kept, so automatic semicolon insertion sees the same code.
    """
    lines = (line.strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("//")) + "\n"


class Script:
    """``v.js`` as served: the bytes, precompressed once, with a strong ETag per encoding."""

    def __init__(self, source: str) -> None:
        self.body = compact(source).encode("utf-8")
        self.gzipped = gzip.compress(self.body, compresslevel=9, mtime=0)
        digest = hashlib.sha256(self.body).hexdigest()[:32]
        self.etag = f'"{digest}"'
        self.gzip_etag = f'"{digest}-gzip"'

    @classmethod
    def packaged(cls) -> Script:
        return cls(resources.files("server").joinpath("static/v.js").read_text("utf-8"))


SCRIPT_HEADERS = {
    "Content-Type": "application/javascript; charset=utf-8",
    "Cache-Control": "public, max-age=3600",
    "Vary": "Accept-Encoding",
    "X-Content-Type-Options": "nosniff",
}

SCRIPT = Script.packaged()


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip: ``gzip;q=0`` refuses it, and ``*``
    stands for any coding not named."""
    qualities: dict[str, float] = {}
    for item in accept_encoding.lower().split(","):
        coding, *params = item.split(";")
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        qualities.setdefault(coding.strip(), quality)
    for coding in ("gzip", "x-gzip", "*"):
        if coding in qualities:
            return qualities[coding] > 0
    return False


def matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2) of an ``If-None-Match`` value with the ETag of the
    representation selected: a client holding the other encoding gets this one in full."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


async def script(request: web.Request) -> web.Response:
    """``GET /v.js``: the script, cacheable, gzipped when the client accepts it; 304 when the
    client's copy is current."""
    request.app[METRICS].requests["/v.js"] += 1
    gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    etag = SCRIPT.gzip_etag if gzipped else SCRIPT.etag
    headers = {**SCRIPT_HEADERS, "ETag": etag}
    # Several field lines make one list (RFC 9110 5.3).
    if matches(",".join(request.headers.getall("If-None-Match", [])), etag):
        return web.Response(status=304, headers=headers)
    if gzipped:
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=SCRIPT.gzipped, headers=headers)
    return web.Response(body=SCRIPT.body, headers=headers)


def setup(app: web.Application) -> None:
    """Adds the viewability routes to the public app."""
    app.router.add_get("/v.gif", event)  # add_get also routes HEAD
    app.router.add_post("/v.gif", event, expect_handler=do_not_continue)
    app.router.add_get("/v.js", script)
